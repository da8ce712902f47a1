"""The CUDA graphs section (`--cuda-graphs`): the 4 x Linear(1024) MLP on one GPU.

Rows, each the median of `repeats` rounds run back to back in this process (a round measures
every row once, so the ratios pair rows of the same round):
- the raw synchronous call over aioti's core (run, then synchronize): p50 latency and runs/s;
- a bare graph replay: the input copied into a captured graph's static input, the graph
  replayed, the stream synchronized (torch's `CUDAGraph.replay`, on the graph aioti captured);
- aioti at concurrency 1 (asyncio, one worker stream) without and with CUDA graphs: p50 and
  its ratio to the raw call's p50 (issue #19's GPU c1 row), the graphs row also to the bare
  replay's (#23's latency);
- aioti at concurrency 64 without graphs (four worker streams, the CUDA default, and one) and
  with graphs on one, two and four streams: requests/s, each graphs row also as a ratio to the
  same row without graphs (`vs [...]`); with dynamic batching (64 rows, one stream) without and
  with graphs; and at batch 64, one stream, without and with graphs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import anyio
import torch

import aioti
from aioti.core import open_container, open_model
from aioti.harness import measure, percentile
from aioti.testing import compile_model

SIZES = (1, 2, 4, 8, 16, 32, 64)


def timed(call: Callable[[], object], duration: float) -> dict[str, float]:
    """`call` back to back for `duration` s: its p50 (ms) and calls/s."""
    lat: list[float] = []
    stop = time.perf_counter() + duration
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        call()
        lat.append(time.perf_counter() - t0)
    return {"p50_ms": percentile(lat, 50) * 1e3, "runs_per_s": len(lat) / sum(lat)}


def raw_call(path: Any, x: torch.Tensor, duration: float) -> dict[str, float]:
    c = open_container(open_model(path), device="cuda")

    def call() -> None:
        c.run([x])
        torch.cuda.synchronize()

    call()  # warm-up
    row = timed(call, duration)
    c.delete()
    return row


def bare_replay(path: Any, x: torch.Tensor, duration: float) -> dict[str, float]:
    async def go() -> dict[str, float]:
        async with aioti.load(path, device="cuda", workers=1,
                              cuda_graphs=aioti.CudaGraphs((x.shape[0],))) as model:
            graph = model._replicas[0].graphs._sets[0][x.shape[0]]  # type: ignore[union-attr]
            side = torch.cuda.Stream()

            def replay() -> None:
                graph.inputs[0].copy_(x, non_blocking=True)
                graph.graph.replay()
                side.synchronize()

            with torch.cuda.stream(side):
                return timed(replay, duration)

    return anyio.run(go)


def aioti_row(path: Any, x: torch.Tensor, tasks: int, workers: int, duration: float,
              graphs: bool, batching: bool = False) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with aioti.load(path, device="cuda", workers=workers,
                              batching=aioti.Batching(64, 2.0) if batching else None,
                              cuda_graphs=aioti.CudaGraphs(SIZES) if graphs else None) as model:
            await model.run([x])
            row = await measure(model, [x], tasks, duration)
            if graphs:
                row["cuda_graphs"] = model.stats()["cuda_graphs"]
            return row

    return anyio.run(go)


def run_graphs(duration: float, repeats: int) -> list[dict[str, Any]]:
    path = compile_model("mid_mlp", "cuda", verbose=True)
    x1 = torch.randn(1, 1024, device="cuda")
    x64 = torch.randn(64, 1024, device="cuda")
    # name, input, tasks, worker streams, graphs, batching
    plans = [("aioti c1, 1 stream", x1, 1, 1, False, False),
             ("aioti c1, 1 stream, graphs", x1, 1, 1, True, False),
             ("aioti c64, 4 streams", x1, 64, 4, False, False),
             ("aioti c64, 1 stream", x1, 64, 1, False, False),
             ("aioti c64, 1 stream, graphs", x1, 64, 1, True, False),
             ("aioti c64, 2 streams, graphs", x1, 64, 2, True, False),
             ("aioti c64, 4 streams, graphs", x1, 64, 4, True, False),
             ("aioti c64, batching 64", x1, 64, 1, False, True),
             ("aioti c64, batching 64, graphs", x1, 64, 1, True, True),
             ("batch 64: aioti c64, 1 stream", x64, 64, 1, False, False),
             ("batch 64: aioti c64, 1 stream, graphs", x64, 64, 1, True, False)]
    rounds: list[dict[str, Any]] = []
    for _ in range(repeats):
        got: dict[str, Any] = {"raw": raw_call(path, x1, duration),
                               "replay": bare_replay(path, x1, duration)}
        for name, x, tasks, workers, graphs, batching in plans:
            got[name] = aioti_row(path, x, tasks, workers, duration, graphs, batching)
        rounds.append(got)
    med = statistics.median
    raw = {k: med(r["raw"][k] for r in rounds) for k in ("p50_ms", "runs_per_s")}
    replay = {k: med(r["replay"][k] for r in rounds) for k in ("p50_ms", "runs_per_s")}
    rows: list[dict[str, Any]] = [{"config": "raw sync core call (run + synchronize)", **raw},
                                  {"config": "bare graph replay (copy in, replay, synchronize)",
                                   **replay}]
    for name, x, *_ in plans:
        row = {"config": name, "batch": x.shape[0],
               "p50_ms": med(r[name]["p50_ms"] for r in rounds),
               "requests_per_s": med(r[name]["requests_per_s"] for r in rounds),
               "loop_lag_p99_ms": med(r[name]["loop_lag_p99_ms"] for r in rounds)}
        if x.shape[0] == 1:
            row["p50_vs_raw_call"] = med(r[name]["p50_ms"] / r["raw"]["p50_ms"] for r in rounds)
        if name == "aioti c1, 1 stream, graphs":
            row["p50_vs_bare_replay"] = med(r[name]["p50_ms"] / r["replay"]["p50_ms"]
                                            for r in rounds)
        if name.endswith(", graphs"):
            plain = name.removesuffix(", graphs")
            for base in {plain, plain.replace("2 streams", "1 stream").replace(
                    "4 streams", "1 stream")} & set(rounds[0]):
                row[f"vs [{base}]"] = med(r[name]["requests_per_s"] / r[base]["requests_per_s"]
                                          for r in rounds)
            row["cuda_graphs"] = rounds[-1][name]["cuda_graphs"]
        rows.append(row)
    for row in rows:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
               if k != "cuda_graphs"}, flush=True)
    return rows
