"""Experiment: is the 4-stream gap to raw threads the pipeline depth? Raw threads keep 64 runs
queued per stream between synchronizations (4 x 64 in flight at 4 streams); aioti at concurrency
64 has 64 requests in flight in all. Measures raw threads at depths 64 and 16 against aioti at
concurrency 64 and 256, back to back, 3 rounds."""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cuda_section import aioti_tasks, raw_threads  # noqa: E402

from aioti.testing import compile_model  # noqa: E402


def ours(path, x, streams, tasks, duration):
    return aioti_tasks(path, x, streams, duration, tasks=tasks)["requests_per_s"]


path = compile_model("mid_mlp", "cuda", verbose=True)
for batch, streams in ((1, 4), (1, 1), (64, 4)):
    x = torch.randn(batch, 1024, device="cuda")
    res = {k: [] for k in ("raw d64", "raw d16", "aioti c64", "aioti c256")}
    for _ in range(3):
        res["raw d64"].append(raw_threads(path, x, streams, 1.5, depth=64))
        res["aioti c64"].append(ours(path, x, streams, 64, 1.5))
        res["raw d16"].append(raw_threads(path, x, streams, 1.5, depth=16))
        res["aioti c256"].append(ours(path, x, streams, 256, 1.5))
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"batch {batch} streams {streams}: " + "  ".join(f"{k} {v:.0f}" for k, v in med.items())
          + f"  | c64/d64 {med['aioti c64'] / med['raw d64']:.2f}  c64/d16 "
          f"{med['aioti c64'] / med['raw d16']:.2f}  c256/d64 "
          f"{med['aioti c256'] / med['raw d64']:.2f}", flush=True)
