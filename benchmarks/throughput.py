"""Throughput and latency of aioti against the synchronous loop and naive thread offloading.

    python benchmarks/throughput.py [--quick] [--json PATH] [--cuda]

One process, every row measured in the same run, each ratio against the synchronous loop over
torch's own loader measured in this run. Rows (per model: small MLP and mid MLP, batch 8):
sync loop; aioti on asyncio and trio at concurrency 1, 16, 64 (default workers, and 2 workers
at 64); batching on (small MLP, 64); naive `anyio.to_thread.run_sync` and `asyncio.to_thread`.
aioti's worker threads are joined after each row; naive rows run last (their pools keep idle
threads). Also: request latency during a stream of hot swaps against steady state (mid MLP).
Each row is the median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aioti  # noqa: E402
from aioti.cli import measure  # noqa: E402
from aioti.testing import compile_model, eager_model  # noqa: E402


def sync_loop(fn: Any, x: torch.Tensor, duration: float) -> dict[str, Any]:
    lat = []
    stop = time.perf_counter() + duration
    t0 = time.perf_counter()
    while time.perf_counter() < stop:
        t = time.perf_counter()
        fn(x)
        lat.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - t0
    lat.sort()
    return {"requests_per_s": len(lat) / elapsed, "p50_ms": lat[len(lat) // 2] * 1e3,
            "p99_ms": lat[int(len(lat) * 0.99)] * 1e3, "loop_lag_p99_ms": None, "errors": 0}


class Naive:
    def __init__(self, fn: Any, kind: str) -> None:
        self.fn, self.kind = fn, kind

    async def run(self, inputs: list[Any]) -> Any:
        if self.kind == "asyncio":
            return await asyncio.to_thread(self.fn, *inputs)
        return await anyio.to_thread.run_sync(self.fn, *inputs)


def median_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = dict(rows[0])
    for k, v in rows[0].items():
        if isinstance(v, (int, float)) and v is not None:
            out[k] = statistics.median(r[k] for r in rows)
    return out


def run_aioti(path: Path, x: torch.Tensor, conc: int, backend: str, duration: float,
              **load_kw: Any) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with aioti.load(path, **load_kw) as model:
            await model.run([x])
            row = await measure(model, [x], conc, duration)
            if model.stats().get("batching"):
                row["batch_rows"] = model.stats()["batching"]["batch_rows"]
            return row

    return anyio.run(go, backend=backend)


def hot_swap_rows(path: Path, duration: float) -> list[dict[str, Any]]:
    """Mid MLP, 16 tasks: latency at steady state, then during back-to-back hot swaps."""
    a = eager_model("mid_mlp").state_dict()
    b = {k: v + 0.01 for k, v in a.items()}
    x = torch.randn(8, 1024)

    async def go() -> list[dict[str, Any]]:
        async with aioti.load(path) as model:
            await model.run([x])
            steady = await measure(model, [x], 16, duration)
            swaps: list[float] = []
            stop = time.perf_counter() + duration

            async def swapper() -> None:
                i = 0
                while time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    await model.hot_swap(b if i % 2 == 0 else a)
                    swaps.append(time.perf_counter() - t0)
                    i += 1

            async with anyio.create_task_group() as tg:
                tg.start_soon(swapper)
                during = await measure(model, [x], 16, duration)
        during["hot_swaps"] = len(swaps)
        during["hot_swap_ms"] = statistics.median(swaps) * 1e3 if swaps else None
        return [{"row": "steady", **steady}, {"row": "during hot swaps", **during}]

    return anyio.run(go)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs, one repeat")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--models", default="small_mlp,mid_mlp")
    ap.add_argument("--cuda", action="store_true", help="the CUDA section only")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.duration = 1, 0.5
    if args.cuda:
        from cuda_section import run_cuda

        rows = run_cuda(args.duration, args.repeats)
        print(json.dumps(rows, indent=2))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0

    rows: list[dict[str, Any]] = []

    def add(model: str, name: str, conc: int | None, fn: Any) -> None:
        row = median_row([fn() for _ in range(args.repeats)])
        row.update(model=model, config=name, concurrency=conc)
        rows.append(row)
        base = next(r for r in rows if r["model"] == model and r["config"] == "sync torch loop")
        row["ratio"] = row["requests_per_s"] / base["requests_per_s"]
        lag = row.get("loop_lag_p99_ms")
        print(f"{model:10} {name:30} {conc or '-':>4} {row['requests_per_s']:9.0f}/s "
              f"x{row['ratio']:5.2f}  p50 {row['p50_ms']:7.3f} ms  p99 {row['p99_ms']:7.3f} ms"
              f"  lag p99 {'-' if lag is None else f'{lag:.2f}'} ms", flush=True)

    for model in args.models.split(","):
        path = compile_model(model, verbose=True)
        x = torch.randn(8, 64 if model == "small_mlp" else 1024)
        loader = torch._inductor.aoti_load_package(str(path))
        core = aioti.core.open_container(aioti.core.open_model(path))
        d = args.duration
        add(model, "sync torch loop", None, lambda: sync_loop(loader, x, d))
        add(model, "sync aioti core loop", None, lambda: sync_loop(lambda t: core.run([t]), x, d))
        core.delete()
        for backend in ("asyncio", "trio"):
            for conc in (1, 16, 64):
                add(model, f"aioti {backend}", conc,
                    lambda b=backend, c=conc: run_aioti(path, x, c, b, d))
            add(model, f"aioti {backend} workers=2", 64,
                lambda b=backend: run_aioti(path, x, 64, b, d, workers=2))
        if model == "small_mlp":
            for backend in ("asyncio", "trio"):
                add(model, f"aioti {backend} batching", 64, lambda b=backend: run_aioti(
                    path, x, 64, b, d, batching=aioti.Batching(max_batch_size=64,
                                                                max_delay_ms=1.0)))
        for kind in ("anyio", "asyncio"):
            for conc in (16, 64):
                add(model, f"naive {kind}.to_thread", conc,
                    lambda k=kind, c=conc: anyio.run(measure, Naive(loader, k), [x], c, d))
    if "mid_mlp" in args.models:
        for r in hot_swap_rows(compile_model("mid_mlp"), args.duration * 2):
            r.update(model="mid_mlp", config=r.pop("row"), concurrency=16)
            rows.append(r)
            print(f"mid_mlp    {r['config']:30}   16 {r['requests_per_s']:9.0f}/s"
                  f"  p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms"
                  + (f"  ({r['hot_swaps']} swaps, {r['hot_swap_ms']:.1f} ms each)"
                     if "hot_swaps" in r else ""), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
