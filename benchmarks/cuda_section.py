"""The CUDA section of the benchmark: the 4 x Linear(1024) MLP on one GPU.

Rows: a synchronous loop over aioti's core (and over torch's loader, run in a subprocess since it
may crash); raw threads over the core, one CUDA stream each, each synchronizing its stream every
64 runs; aioti on asyncio at concurrency 64 with 1, 2 and 4 worker streams, each measured right
after raw threads with as many streams, and with 2 and 4 streams also at 64 tasks per stream
(`vs_raw_c128`, `vs_raw_c256`: the same work in flight per stream as the raw threads). Batch 1
and 64, and at batch 1 dynamic batching on one stream (its ratio is still against raw threads'
unbatched runs: requests/s against runs/s).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import anyio
import torch

import aioti
from aioti.core import open_container, open_model
from aioti.harness import measure
from aioti.testing import compile_model


def raw_threads(path: Any, x: torch.Tensor, streams: int, duration: float, depth: int = 64
                ) -> float:
    """Runs/s of `streams` threads, each launching `depth` runs on its own stream between
    synchronizations."""
    c = open_container(open_model(path), device="cuda", num_models=streams)
    counts = [0] * streams
    stop = time.perf_counter() + duration

    def work(i: int) -> None:
        s = torch.cuda.Stream()
        torch.cuda.set_stream(s)
        h = s.cuda_stream
        while time.perf_counter() < stop:
            for _ in range(depth):
                c.run_tensors([x], h)
            s.synchronize()
            counts[i] += depth

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = sum(counts) / (time.perf_counter() - t0)
    c.delete()
    return rate


def sync_core(path: Any, x: torch.Tensor, duration: float) -> float:
    c = open_container(open_model(path), device="cuda")
    n, stop, t0 = 0, time.perf_counter() + duration, time.perf_counter()
    while time.perf_counter() < stop:
        c.run([x])
        torch.cuda.synchronize()
        n += 1
    rate = n / (time.perf_counter() - t0)
    c.delete()
    return rate


TORCH_LOADER = """
import sys, time, torch
m = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.randn(int(sys.argv[2]), 1024, device="cuda")
n, stop, t0 = 0, time.perf_counter() + float(sys.argv[3]), time.perf_counter()
while time.perf_counter() < stop:
    m(x); torch.cuda.synchronize(); n += 1
print(n / (time.perf_counter() - t0))
"""


def torch_loader(path: Any, batch: int, duration: float) -> float | str:
    p = subprocess.run([sys.executable, "-c", TORCH_LOADER, str(path), str(batch), str(duration)],
                       capture_output=True, text=True, timeout=300)
    if p.returncode:
        return f"crashed (exit {p.returncode})"
    return float(p.stdout.strip().splitlines()[-1])


def aioti_tasks(path: Any, x: torch.Tensor, streams: int, duration: float,
                batching: aioti.Batching | None = None, tasks: int = 64) -> dict[str, Any]:
    """aioti on asyncio, `tasks` tasks, `streams` worker streams (optionally with batching)."""

    async def go() -> dict[str, Any]:
        async with aioti.load(path, device="cuda", workers=streams, batching=batching) as model:
            await model.run([x])
            row = await measure(model, [x], tasks, duration)
            if batching is not None:
                row["batch_rows"] = model.stats()["batching"]["batch_rows"]
            return row

    return anyio.run(go)


def run_cuda(duration: float, repeats: int) -> list[dict[str, Any]]:
    """Each aioti row is `repeats` back-to-back pairs (raw threads, then aioti) and its ratio the
    median of the pairs' ratios: this host's raw rate drifts by up to 1.7x between runs."""
    path = compile_model("mid_mlp", "cuda", verbose=True)
    rows: list[dict[str, Any]] = []
    med = statistics.median
    for batch in (1, 64):
        x = torch.randn(batch, 1024, device="cuda")
        base = med(sync_core(path, x, duration) for _ in range(repeats))
        rows.append({"batch": batch, "config": "sync aioti core loop", "runs_per_s": base})
        rows.append({"batch": batch, "config": "sync torch loader loop",
                     "runs_per_s": torch_loader(path, batch, duration)})
        plans: list[tuple[int, aioti.Batching | None]] = [(1, None), (2, None), (4, None)]
        if batch == 1:
            plans.append((1, aioti.Batching(max_batch_size=64, max_delay_ms=2.0)))
        for streams, batching in plans:
            # Raw threads keep 64 runs queued per stream; 64 tasks spread over several streams
            # leave each a shallower queue. So with several streams, aioti is also measured with
            # 64 tasks per stream: the same work in flight per stream as raw threads.
            deep = 64 * streams if batching is None and streams > 1 else None
            pairs = [(raw_threads(path, x, streams, duration),
                      aioti_tasks(path, x, streams, duration, batching),
                      aioti_tasks(path, x, streams, duration, tasks=deep) if deep else None)
                     for _ in range(repeats)]
            raw = med(p[0] for p in pairs)
            name = f"aioti asyncio c64, {streams} streams" + (", batching" if batching else "")
            ratios = [p[1]["requests_per_s"] / p[0] for p in pairs]
            if batching is None:
                rows.append({"batch": batch, "config": f"raw threads, {streams} streams",
                             "runs_per_s": raw})
            row = {"batch": batch, "config": name,
                   "runs_per_s": med(p[1]["requests_per_s"] for p in pairs),
                   "vs_raw": med(ratios), "pair_ratios": [round(r, 2) for r in ratios],
                   "loop_lag_p99_ms": med(p[1]["loop_lag_p99_ms"] for p in pairs),
                   "p99_ms": med(p[1]["p99_ms"] for p in pairs)}
            if batching is not None:
                row["batch_rows"] = pairs[-1][1]["batch_rows"]
            if deep:
                deep_ratios = [p[2]["requests_per_s"] / p[0] for p in pairs if p[2]]
                row.update({f"runs_per_s_c{deep}": med(p[2]["requests_per_s"] for p in pairs if p[2]),
                            f"vs_raw_c{deep}": med(deep_ratios),
                            f"pair_ratios_c{deep}": [round(r, 2) for r in deep_ratios]})
            rows.append(row)
        add_scaling(rows, batch)
        for r in rows:
            if r["batch"] == batch:
                print(r, flush=True)
    return rows


def add_scaling(rows: list[dict[str, Any]], batch: int) -> None:
    """Each aioti row's rate over one stream's (`vs_1_stream`), and with 64 tasks per stream
    (`vs_1_stream_c128`, `vs_1_stream_c256`: as much in flight per stream as one stream's 64)."""
    one = next(r for r in rows if r["batch"] == batch
               and r["config"] == "aioti asyncio c64, 1 streams")["runs_per_s"]
    for r in rows:
        if r["batch"] == batch and r["config"].startswith("aioti"):
            r["vs_1_stream"] = r["runs_per_s"] / one
            for key in [k for k in r if k.startswith("runs_per_s_c")]:
                r[f"vs_1_stream_{key.rsplit('_', 1)[1]}"] = r[key] / one
