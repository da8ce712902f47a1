"""Throughput and latency of aioti against the synchronous loop and naive thread offloading.

    python benchmarks/throughput.py [--quick] [--json PATH] [--cuda | --cuda-graphs | ...]

One command; every ratio is against the synchronous loop over torch's own loader measured in the
same run. Each row runs in a child process of its own: threads a row leaves behind (OpenMP teams
of the model's kernels, `to_thread` pools) measurably slow later rows in the same process (seen:
aioti 38k/s before a synchronous torch loop, 17-21k/s after it). Rows (per model: small MLP and
mid MLP, batch 8): sync loops over torch's loader and over aioti's core; aioti on asyncio and
trio at concurrency 1, 16, 64 (default workers, and 2 workers at 64; asyncio's rows each
paired with the sync torch loop, the ratios of #19's targets); batching on (small MLP,
64 tasks of 1- or 8-row requests, on asyncio, uvloop and trio, batches run by the worker or
`on_loop`, each paired with a sync torch loop on the same requests; and the on-loop rows' floor,
a minimal batcher per loop without aioti's checks and bookkeeping, `reference.py`); naive
`anyio.to_thread.run_sync` and `asyncio.to_thread`; request latency during a stream of hot swaps
against steady state (mid MLP); under contention (one CPU-bound process competing for the
cores), aioti asyncio at concurrency 1 and 64, each paired with the contended sync loop. Each
row is the median of `--repeats` runs (paired rows: the median of at least 5 pairs' ratios).

The JSON is `{"machine": {...}, "rows": [...]}`: the CPU model, cores, torch, Python (and the
GPU, where one is used) with the rows measured on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aioti  # noqa: E402
from aioti.harness import measure  # noqa: E402
from aioti.testing import compile_model, eager_model  # noqa: E402


def machine() -> dict[str, Any]:
    """What the rows were measured on."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(),
                           "usable_cores": len(os.sched_getaffinity(0))
                           if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                           "torch": torch.__version__, "python": platform.python_version(),
                           "platform": platform.platform()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def write_json(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


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
    """Mid MLP, 16 tasks: latency at steady state, then during a stream of hot swaps (one every
    50 ms, alternating two weight sets)."""
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
                    await anyio.sleep(max(0.0, 0.05 - (time.perf_counter() - t0)))

            async with anyio.create_task_group() as tg:
                tg.start_soon(swapper)
                during = await measure(model, [x], 16, duration)
        during["hot_swaps"] = len(swaps)
        during["hot_swap_ms"] = statistics.median(swaps) * 1e3 if swaps else None
        return [{"row": "steady", **steady}, {"row": "during hot swaps", **during}]

    return anyio.run(go)


def batching_row(path: Path, config: str, duration: float) -> dict[str, Any]:
    """One measurement of dynamic batching (64 tasks sending small requests), or with
    "baseline" in `config`, of the synchronous torch loop on the same requests. Also the time
    of one full batched run, for the latency bound p99 <= max_delay + 2 x batched run."""
    rows = 8 if "batch 8" in config else 1
    x = torch.randn(rows, 64)
    cfg = aioti.Batching(max_batch_size=64 * rows, max_delay_ms=2.0, on_loop="on_loop" in config)
    if "baseline" in config:
        # In a process of its own: once another thread has run an OpenMP region (an aioti
        # worker, or the thread that loaded the model), libgomp stops spinning and this loop
        # measurably slows down (seen: 25k -> 12k runs/s).
        loader = torch._inductor.aoti_load_package(str(path))
        sync_loop(loader, x, duration / 4)
        return sync_loop(loader, x, duration)
    core = aioti.core.open_container(aioti.core.open_model(path))
    loop_kind = config.split()[1]
    if "reference" in config:
        return reference_row(core, x, cfg.max_batch_size, loop_kind, duration)
    full = torch.randn(cfg.max_batch_size, 64)
    runs = []
    for _ in range(1000):
        t = time.perf_counter()
        core.run_tensors([full], None)
        runs.append(time.perf_counter() - t)
    core.delete()
    run_ms = statistics.median(runs) * 1e3

    async def go() -> dict[str, Any]:
        async with aioti.load(path, batching=cfg) as model:
            await measure(model, [x], 64, duration / 4)  # warm-up
            row = await measure(model, [x], 64, duration)
            row["batch_rows"] = model.stats()["batching"]["batch_rows"]
            return row

    row = run_on(loop_kind, go)
    row["batched_run_ms"] = run_ms
    row["p99_bound_ms"] = cfg.max_delay_ms + 2 * run_ms
    return row


def reference_row(core: Any, x: torch.Tensor, max_rows: int, loop_kind: str, duration: float
                  ) -> dict[str, Any]:
    """The on-loop rows' floor: a minimal batcher for one loop over the same core
    (`reference.py`), from the same 64 tasks."""
    from reference import AsyncioReference, TrioReference

    async def go() -> dict[str, Any]:
        batcher = (TrioReference if loop_kind == "trio" else AsyncioReference)(core, max_rows)
        await measure(batcher, [x], 64, duration / 4)  # warm-up
        return await measure(batcher, [x], 64, duration)

    return run_on(loop_kind, go)


def run_on(loop_kind: str, go: Callable[[], Coroutine[Any, Any, dict[str, Any]]]
           ) -> dict[str, Any]:
    """Run `go` to its end on an event loop of `loop_kind` (asyncio, uvloop or trio)."""
    if loop_kind == "trio":
        import trio

        return trio.run(go)  # type: ignore[no-any-return]
    if loop_kind == "uvloop":
        import uvloop

        return uvloop.run(go())  # type: ignore[no-any-return]
    return asyncio.run(go())


HOG = "while True: sum(range(10000))"


def run_row(model: str, config: str, conc: int | None, duration: float, repeats: int
            ) -> list[dict[str, Any]]:
    """One row, measured in this (child) process. A "contended" row runs while one CPU-bound
    process competes for the machine's cores."""
    if config.startswith("contended "):
        hog = subprocess.Popen([sys.executable, "-c", HOG])
        try:
            time.sleep(0.2)
            return run_row(model, config.removeprefix("contended "), conc, duration, repeats)
        finally:
            hog.kill()
            hog.wait(timeout=10)
    path = compile_model(model)
    if "batching" in config:
        return [batching_row(path, config, duration)]
    x = torch.randn(8, 64 if model == "small_mlp" else 1024)
    d = duration
    if config == "hot swaps":
        return hot_swap_rows(path, d * 2)
    if config == "sync torch loop":
        loader = torch._inductor.aoti_load_package(str(path))
        fn: Any = lambda: sync_loop(loader, x, d)
    elif config == "sync aioti core loop":
        core = aioti.core.open_container(aioti.core.open_model(path))
        fn = lambda: sync_loop(lambda t: core.run([t]), x, d)
    elif config.startswith("naive"):
        loader = torch._inductor.aoti_load_package(str(path))
        kind = config.split()[1].split(".")[0]
        fn = lambda: anyio.run(measure, Naive(loader, kind), [x], conc, d)
    else:
        backend = config.split()[1]
        kw: dict[str, Any] = {}
        if "workers=2" in config:
            kw["workers"] = 2
        fn = lambda: run_aioti(path, x, conc or 1, backend, d, **kw)
    fn()  # warm-up
    return [median_row([fn() for _ in range(repeats)])]


def plan(models: list[str]) -> list[tuple[str, str, int | None]]:
    rows: list[tuple[str, str, int | None]] = []
    for model in models:
        rows += [(model, "sync torch loop", None), (model, "sync aioti core loop", None)]
        for backend in ("asyncio", "trio"):
            rows += [(model, f"aioti {backend}", c) for c in (1, 16, 64)]
            rows.append((model, f"aioti {backend} workers=2", 64))
        rows += [(model, f"naive {k}.to_thread", c) for k in ("anyio", "asyncio") for c in (16, 64)]
        if model == "small_mlp":
            for where in ("", " on_loop"):
                rows += [(model, f"batching {k}{where} batch 1", 64)
                         for k in ("asyncio", "uvloop", "trio")]
                rows.append((model, f"batching asyncio{where} batch 8", 64))
            # The floor of on-loop batching: a minimal batcher per loop (benchmarks/reference.py).
            rows += [(model, f"batching {k} reference batch 1", 64) for k in ("asyncio", "trio")]
        if model == "mid_mlp":
            rows.append((model, "hot swaps", 16))
        # One CPU-bound process competing: aioti against the sync loop under the same load,
        # each in pairs (the competition makes the machine's drift larger).
        rows += [(model, "contended aioti asyncio", c) for c in (1, 64)]
    return rows


def child_row(spec: list[Any], args: argparse.Namespace, repeats: int | None = None
              ) -> list[dict[str, Any]] | None:
    """Measure one row in a child process of its own."""
    cmd = [sys.executable, __file__, "--row", json.dumps(spec), "--duration",
           str(args.duration), "--repeats", str(repeats or args.repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
    if line is None:
        print(f"{spec[0]:10} {spec[1]:30} failed: {proc.stderr.strip()[-300:]}", flush=True)
        return None
    return json.loads(line[4:])  # type: ignore[no-any-return]


def paired_rows(model: str, config: str, conc: int | None, baseline: str,
                args: argparse.Namespace) -> list[dict[str, Any]] | None:
    """Rows against a baseline of their own (batching: the synchronous torch loop on the same
    requests; contended: the synchronous loop under the same competition; asyncio with the
    default workers: the synchronous loop): `--repeats` (at least 5) pairs of child processes,
    the baseline, then the row; the ratio is the median of the pairs' ratios, and so is the
    ratio of p50 latencies (this machine's speed drifts by 2x over minutes, so each pair is
    measured back to back)."""
    pairs = []
    for _ in range(max(args.repeats, 5)):
        base = child_row([model, baseline, None], args, 1)
        row = child_row([model, config, conc], args, 1)
        if base is None or row is None:
            return None
        pairs.append((base[0], row[0]))
    med = statistics.median
    out = {k: med(p[1][k] for p in pairs)
           for k in ("requests_per_s", "p50_ms", "p90_ms", "p99_ms", "loop_lag_p99_ms",
                     "batched_run_ms", "p99_bound_ms") if k in pairs[0][1]}
    out["errors"] = sum(p[1]["errors"] for p in pairs)
    if "batch_rows" in pairs[0][1]:
        out["batch_rows"] = pairs[len(pairs) // 2][1]["batch_rows"]
    out["sync_torch_per_s"] = med(p[0]["requests_per_s"] for p in pairs)
    ratios = [p[1]["requests_per_s"] / p[0]["requests_per_s"] for p in pairs]
    out["paired_ratio"] = med(ratios)
    out["paired_p50_ratio"] = med(p[1]["p50_ms"] / p[0]["p50_ms"] for p in pairs)
    out["pair_ratios"] = [round(r, 2) for r in ratios]
    return [out]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short runs, one repeat")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--duration", type=float, default=2.0)
    ap.add_argument("--models", default="small_mlp,mid_mlp")
    ap.add_argument("--cuda", action="store_true", help="the CUDA section only")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="the CUDA graphs section only (graphs.py; includes the GPU c1 row)")
    ap.add_argument("--devices", action="store_true",
                    help="the multi-device section only (two GPUs)")
    ap.add_argument("--workers", type=int, default=1, help="workers per GPU (--devices)")
    ap.add_argument("--per-gpu", action="store_true",
                    help="--devices: 256 tasks per GPU (512 on two) instead of 256 on either")
    ap.add_argument("--serving", action="store_true",
                    help="the serving section only (aioti serve over HTTP; LitServe if installed)")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # child mode: one row as JSON
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.duration = 1, 0.5
    if args.row:
        model, config, conc = json.loads(args.row)
        print("ROW " + json.dumps(run_row(model, config, conc, args.duration, args.repeats)))
        return 0
    if args.cuda or args.devices or args.serving or args.cuda_graphs:
        if args.cuda_graphs:
            from graphs import run_graphs

            rows = run_graphs(args.duration, args.repeats)
        elif args.serving:
            from serving import run_serving

            rows = run_serving(args.duration)
        elif args.cuda:
            from cuda_section import run_cuda

            rows = run_cuda(args.duration, args.repeats)
        else:
            from multi_device import run_devices

            rows = run_devices(args.duration, args.repeats, args.workers, args.per_gpu)
        if args.json:
            write_json(args.json, rows)
        return 0

    for model in args.models.split(","):
        compile_model(model, verbose=True)
    rows: list[dict[str, Any]] = []
    base: dict[str, float] = {}  # each model's sync torch loop (contended rows pair their own)
    for model, config, conc in plan(args.models.split(",")):
        if config.startswith("batching"):
            found = paired_rows(model, config, conc, f"{config} baseline", args)
        elif config.startswith("contended "):
            found = paired_rows(model, config, conc, "contended sync torch loop", args)
        elif config == "aioti asyncio":  # #19's targets: each against its own pair
            found = paired_rows(model, config, conc, "sync torch loop", args)
        else:
            found = child_row([model, config, conc], args)
        if found is None:
            continue
        for row in found:
            name = row.pop("row", config)
            row.update(model=model, config=name, concurrency=conc)
            if name == "sync torch loop":
                base[model] = row["requests_per_s"]
            if "paired_ratio" in row:
                row["ratio"] = row["paired_ratio"]  # against its own paired sync loop
            else:
                row["ratio"] = row["requests_per_s"] / base[model] if model in base else None
            rows.append(row)
            lag = row.get("loop_lag_p99_ms")
            extra = (f"  ({row['hot_swaps']} swaps, {row['hot_swap_ms']:.1f} ms each)"
                     if row.get("hot_swaps") else "")
            if "paired_ratio" in row:
                bound = row.get("p99_bound_ms")
                extra = (f"  (sync torch {row['sync_torch_per_s']:.0f}/s, pairs "
                         f"{row['pair_ratios']}"
                         f"{'' if bound is None else f', p99 bound {bound:.2f} ms'})")
            if "paired_p50_ratio" in row and conc == 1:
                extra += f"  (p50 x{row['paired_p50_ratio']:.2f} the sync loop's)"
            print(f"{model:10} {name:30} {conc or '-':>4} {row['requests_per_s']:9.0f}/s "
                  f"x{row['ratio'] or 0:5.2f}  p50 {row['p50_ms']:7.3f} ms  "
                  f"p99 {row['p99_ms']:7.3f} ms  lag p99 "
                  f"{'-' if lag is None else f'{lag:.2f}'} ms{extra}", flush=True)
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
