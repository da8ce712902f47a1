"""The CUDA graphs section (`--cuda-graphs`): the 4 x Linear(1024) MLP on one GPU.

Rows, each the median of `repeats` rounds run back to back in this process (a round measures
every row once, so the ratios pair rows of the same round):
- the raw synchronous call over aioti's core (run, then synchronize): p50 latency and runs/s;
- a bare graph replay: the input copied into a captured graph's static input, the graph
  replayed, the stream synchronized (torch's `CUDAGraph.replay`, on a graph of the core's run
  captured with torch alone);
- aioti at concurrency 1 (asyncio, one worker stream) without and with CUDA graphs: p50 and
  its ratio to the raw call's p50 (issue #19's GPU c1 row), the graphs row also to the bare
  replay's (#23's latency). These four take turns of a fraction of a second within a round
  (`c1_rows`): the ratios pair each turn's row with the same turn's baseline;
- aioti at concurrency 64 without graphs (four worker streams and one) and with graphs on one,
  two and four streams: requests/s, each graphs row also as a ratio to the same row without
  graphs (`vs [...]`); with dynamic batching (64 rows, one stream) without and with graphs; and
  at batch 64, one stream, without and with graphs. These take turns too (`turns_rows`): every
  model loaded at once, each measured a quarter of its time a turn.
"""

from __future__ import annotations

import contextlib
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


def c1_rows(path: Any, x: torch.Tensor, duration: float, turns: int = 6) -> dict[str, Any]:
    """The concurrency-1 rows and their baselines in one process, taking turns: the raw call,
    aioti c1 without graphs, the bare replay and aioti c1 with graphs, each for
    `duration / turns` s a turn (after one turn of warm-up). This host's speed moves by a third
    within seconds, so rows measured seconds apart drift apart; turns of a fraction of a second
    pair each row with its baseline. p50s are the medians of the turns'; each ratio the median
    of the turns' ratios."""
    core = open_container(open_model(path), device="cuda")
    side = torch.cuda.Stream()
    n = x.shape[0]
    static = torch.zeros_like(x)  # the bare replay's graph: a run captured with torch alone
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            core.capture_run([static], side.cuda_stream)
    side.synchronize()
    bare = torch.cuda.CUDAGraph()
    with torch.cuda.graph(bare, stream=side):
        core.capture_run([static], side.cuda_stream)

    async def go() -> dict[str, Any]:
        async with aioti.load(path, device="cuda", workers=1) as plain, aioti.load(
                path, device="cuda", workers=1, cuda_graphs=aioti.CudaGraphs((n,))) as graphed:

            def raw() -> None:
                core.run([x])
                torch.cuda.synchronize()

            def replay() -> None:  # on `side`, made current around its turn
                static.copy_(x, non_blocking=True)
                bare.replay()
                side.synchronize()

            got: dict[str, list[dict[str, Any]]] = {k: [] for k in (
                "raw", "replay", "aioti c1, 1 stream", "aioti c1, 1 stream, graphs")}
            d = duration / turns
            for turn in range(turns + 1):
                with torch.cuda.stream(side):
                    replayed = timed(replay, d)
                rows = {"raw": timed(raw, d), "replay": replayed,
                        "aioti c1, 1 stream": await measure(plain, [x], 1, d),
                        "aioti c1, 1 stream, graphs": await measure(graphed, [x], 1, d)}
                if turn:
                    for k, row in rows.items():
                        got[k].append(row)
            stats = graphed.stats()["cuda_graphs"]
        med = statistics.median
        out: dict[str, Any] = {k: {key: med(r[key] for r in rs) for key in rs[0]}
                               for k, rs in got.items()}
        raws, replays = got["raw"], got["replay"]
        for name in ("aioti c1, 1 stream", "aioti c1, 1 stream, graphs"):
            out[name]["p50_vs_raw_call"] = med(
                r["p50_ms"] / b["p50_ms"] for r, b in zip(got[name], raws))
        out["aioti c1, 1 stream, graphs"]["p50_vs_bare_replay"] = med(
            r["p50_ms"] / b["p50_ms"] for r, b in zip(got["aioti c1, 1 stream, graphs"], replays))
        out["aioti c1, 1 stream, graphs"]["cuda_graphs"] = stats
        return out

    try:
        return anyio.run(go)
    finally:
        core.delete()


def turns_rows(path: Any, plans: list[tuple[str, torch.Tensor, int, int, bool, bool]],
               duration: float, turns: int = 4) -> dict[str, Any]:
    """The concurrency-64 rows of one round, taking turns: every plan's model is loaded at
    once, then each is measured for `duration / turns` s a turn, plan after plan (after a warm-
    up turn). A graphs row's `vs [...]` ratios are the medians of the turns' ratios to the row
    named (`c1_rows`'s reason: measured seconds apart, rows drift apart with the host)."""
    async def go() -> dict[str, Any]:
        async with contextlib.AsyncExitStack() as stack:
            models = {}
            for name, x, _tasks, workers, graphs, batching in plans:
                models[name] = await stack.enter_async_context(aioti.load(
                    path, device="cuda", workers=workers,
                    batching=aioti.Batching(64, 2.0) if batching else None,
                    cuda_graphs=aioti.CudaGraphs(SIZES) if graphs else None))
                await models[name].run([x])
            got: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in plans}
            d = duration / turns
            for turn in range(turns + 1):
                for name, x, tasks, *_ in plans:
                    row = await measure(models[name], [x], tasks, d)
                    if turn:
                        got[name].append(row)
            stats = {name: models[name].stats()["cuda_graphs"]
                     for name, *_rest, graphs, _batching in plans if graphs}
        med = statistics.median
        out: dict[str, Any] = {name: {key: med(r[key] for r in rs) for key in rs[0]}
                               for name, rs in got.items()}
        for name, graphed in stats.items():
            out[name]["cuda_graphs"] = graphed
            for base in _bases(name) & set(got):
                out[name][f"vs [{base}]"] = med(
                    r["requests_per_s"] / b["requests_per_s"]
                    for r, b in zip(got[name], got[base]))
        return out

    return anyio.run(go)


def _bases(name: str) -> set[str]:
    """The rows without graphs a graphs row is compared with: the same configuration, and one
    stream."""
    plain = name.removesuffix(", graphs")
    return {plain, plain.replace("2 streams", "1 stream").replace("4 streams", "1 stream")}


def run_graphs(duration: float, repeats: int) -> list[dict[str, Any]]:
    path = compile_model("mid_mlp", "cuda", verbose=True)
    x1 = torch.randn(1, 1024, device="cuda")
    x64 = torch.randn(64, 1024, device="cuda")
    # name, input, tasks, worker streams, graphs, batching
    plans = [("aioti c64, 4 streams", x1, 64, 4, False, False),
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
        got: dict[str, Any] = c1_rows(path, x1, 2 * duration)
        got.update(turns_rows(path, plans, duration))
        rounds.append(got)
    med = statistics.median
    raw = {k: med(r["raw"][k] for r in rounds) for k in ("p50_ms", "runs_per_s")}
    replay = {k: med(r["replay"][k] for r in rounds) for k in ("p50_ms", "runs_per_s")}
    rows: list[dict[str, Any]] = [{"config": "raw sync core call (run + synchronize)", **raw},
                                  {"config": "bare graph replay (copy in, replay, synchronize)",
                                   **replay}]
    c1 = [("aioti c1, 1 stream", x1), ("aioti c1, 1 stream, graphs", x1)]
    for name, x, *_ in c1 + plans:
        row = {"config": name, "batch": x.shape[0],
               "p50_ms": med(r[name]["p50_ms"] for r in rounds),
               "requests_per_s": med(r[name]["requests_per_s"] for r in rounds),
               "loop_lag_p99_ms": med(r[name]["loop_lag_p99_ms"] for r in rounds)}
        for key in ("p50_vs_raw_call", "p50_vs_bare_replay"):
            if key in rounds[0][name]:  # the c1 rows: measured in turns with their baselines
                row[key] = med(r[name][key] for r in rounds)
        if x.shape[0] == 1 and "p50_vs_raw_call" not in row:
            row["p50_vs_raw_call"] = med(r[name]["p50_ms"] / r["raw"]["p50_ms"] for r in rounds)
        if name.endswith(", graphs"):
            for base in _bases(name) & set(rounds[0]):
                key = f"vs [{base}]"  # the c64 rows': paired in turns (`turns_rows`)
                row[key] = med(r[name][key] if key in r[name] else
                               r[name]["requests_per_s"] / r[base]["requests_per_s"]
                               for r in rounds)
            row["cuda_graphs"] = rounds[-1][name]["cuda_graphs"]
        rows.append(row)
    for row in rows:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
               if k != "cuda_graphs"}, flush=True)
    return rows
