"""Experiment: is the 4-stream gap to raw threads the pipeline depth? Raw threads keep 64 runs
queued per stream between synchronizations (4 x 64 in flight at 4 streams); aioti at concurrency
64 has 64 requests in flight in all. Measures raw threads at depths 64 and 16 against aioti at
concurrency 64 and 256, back to back, 3 rounds."""
import statistics
import sys
import threading
import time
from pathlib import Path

import anyio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import aioti  # noqa: E402
from aioti.cli import measure  # noqa: E402
from aioti.core import open_container, open_model  # noqa: E402
from aioti.core.library import handles_from_tensors  # noqa: E402
from aioti.testing import compile_model  # noqa: E402


def raw(path, x, streams, depth, duration):
    c = open_container(open_model(path), device="cuda", num_models=streams)
    counts = [0] * streams
    stop = time.perf_counter() + duration

    def work(i):
        s = torch.cuda.Stream()
        torch.cuda.set_stream(s)
        h = s.cuda_stream
        while time.perf_counter() < stop:
            for _ in range(depth):
                c._run(handles_from_tensors([x]), h)
            s.synchronize()
            counts[i] += depth

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work, args=(i,)) for i in range(streams)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    rate = sum(counts) / (time.perf_counter() - t0)
    c.delete()
    return rate


def ours(path, x, streams, conc, duration):
    async def go():
        async with aioti.load(path, device="cuda", workers=streams) as model:
            await model.run([x])
            return await measure(model, [x], conc, duration)
    return anyio.run(go)["requests_per_s"]


path = compile_model("mid_mlp", "cuda", verbose=True)
for batch, streams in ((1, 4), (1, 1), (64, 4)):
    x = torch.randn(batch, 1024, device="cuda")
    res = {k: [] for k in ("raw d64", "raw d16", "aioti c64", "aioti c256")}
    for _ in range(3):
        res["raw d64"].append(raw(path, x, streams, 64, 1.5))
        res["aioti c64"].append(ours(path, x, streams, 64, 1.5))
        res["raw d16"].append(raw(path, x, streams, 16, 1.5))
        res["aioti c256"].append(ours(path, x, streams, 256, 1.5))
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"batch {batch} streams {streams}: " + "  ".join(f"{k} {v:.0f}" for k, v in med.items())
          + f"  | c64/d64 {med['aioti c64'] / med['raw d64']:.2f}  c64/d16 "
          f"{med['aioti c64'] / med['raw d16']:.2f}  c256/d64 "
          f"{med['aioti c256'] / med['raw d64']:.2f}", flush=True)
