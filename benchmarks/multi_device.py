"""The multi-device section (`throughput.py --devices`, needs two GPUs): the 4 x Linear(1024)
model at batch 1 and 64, one GPU against a replica pool on two, with and without dynamic
batching, from enough asyncio tasks to fill both; and a hot swap under load on both.

Each cell is `repeats` back-to-back pairs (one GPU, then two) and its ratio the median of the
pairs' ratios. The hot swap row alternates two weight sets under load and counts outputs that
match neither set's eager result (torn) and requests that failed.
"""

from __future__ import annotations

import statistics
from typing import Any

import anyio
import torch

import aioti
from aioti.harness import measure
from aioti.testing import compile_model, eager_model


class Spread:
    """Requests whose inputs alternate between copies on each device, as a service's would
    arrive from callers on both (inputs on a device go to that device's replica)."""

    def __init__(self, model: Any, xs: list[torch.Tensor]) -> None:
        self.model, self.xs, self.i = model, xs, 0

    def run(self, inputs: list[torch.Tensor]) -> Any:
        self.i += 1
        return self.model.run([self.xs[self.i % len(self.xs)]])


def pool_rate(path: Any, devices: list[str], x: torch.Tensor, tasks: int, duration: float,
              workers: int, batching: aioti.Batching | None) -> dict[str, Any]:
    xs = [x.to(d) for d in devices]

    async def go() -> dict[str, Any]:
        async with aioti.load(path, device=devices, workers=workers, batching=batching) as model:
            for y in xs:
                await model.run([y])
            row = await measure(Spread(model, xs), [x], tasks, duration)
            stats = model.stats()
            row["per_replica"] = [r["completed"] for r in stats.get("replicas", [stats])]
            return row

    return anyio.run(go)


def hot_swap_under_load(path: Any, devices: list[str], duration: float) -> dict[str, Any]:
    a = eager_model("mid_mlp", "cuda")
    b = eager_model("mid_mlp", "cuda")
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(-0.5)
    x = torch.randn(4, 1024, device="cuda:0")
    with torch.no_grad():
        refs = [a(x), b(x)]
    xs = [x, x.to("cuda:1")]
    sets = [a.state_dict(), b.state_dict()]
    counts = {"requests": 0, "torn": 0, "failed": 0, "swaps": 0, "per_replica": []}

    async def go() -> None:
        async with aioti.load(path, device=devices) as model:
            stop = False

            async def caller(k: int) -> None:
                while not stop:
                    try:
                        out = await model(xs[k % 2])
                    except Exception:
                        counts["failed"] += 1
                        continue
                    counts["requests"] += 1
                    if not any(torch.allclose(out.to(r.device), r, atol=1e-3) for r in refs):
                        counts["torn"] += 1

            async with anyio.create_task_group() as tg:
                for k in range(128):
                    tg.start_soon(caller, k)
                end = anyio.current_time() + duration
                while anyio.current_time() < end:
                    await model.hot_swap(sets[(counts["swaps"] + 1) % 2])
                    counts["swaps"] += 1
                stop = True
            counts["per_replica"] = [r["completed"] for r in model.stats()["replicas"]]

    anyio.run(go)
    return {"config": "hot swap under load, two GPUs", **counts}


def run_devices(duration: float, repeats: int, workers: int = 1, per_gpu: bool = False
                ) -> list[dict[str, Any]]:
    """`per_gpu`: 256 tasks per GPU (512 on two) instead of 256 on either."""
    path = compile_model("mid_mlp", "cuda", verbose=True)
    two = ["cuda:0", "cuda:1"]
    med = statistics.median
    rows: list[dict[str, Any]] = []
    for batch in (1, 64):
        x = torch.randn(batch, 1024, device="cuda:0")
        plans: list[aioti.Batching | None] = [None]
        if batch == 1:
            plans.append(aioti.Batching(max_batch_size=64, max_delay_ms=1.0))
        for batching in plans:
            tasks = 256
            pairs = [(pool_rate(path, ["cuda:0"], x, tasks, duration, workers, batching),
                      pool_rate(path, two, x, tasks * (2 if per_gpu else 1), duration, workers,
                                batching))
                     for _ in range(repeats)]
            ratios = [p[1]["requests_per_s"] / p[0]["requests_per_s"] for p in pairs]
            row = {"batch": batch, "batching": batching is not None, "tasks": tasks,
                   "tasks_two": tasks * (2 if per_gpu else 1),
                   "workers_per_gpu": workers,
                   "one_gpu_req_s": med(p[0]["requests_per_s"] for p in pairs),
                   "two_gpus_req_s": med(p[1]["requests_per_s"] for p in pairs),
                   "two_vs_one": med(ratios), "pair_ratios": [round(r, 2) for r in ratios],
                   "loop_lag_p99_ms_one": med(p[0]["loop_lag_p99_ms"] for p in pairs),
                   "loop_lag_p99_ms_two": med(p[1]["loop_lag_p99_ms"] for p in pairs),
                   "p99_ms_two": med(p[1]["p99_ms"] for p in pairs),
                   "per_replica_two": pairs[-1][1]["per_replica"]}
            print(row, flush=True)
            rows.append(row)
    row = hot_swap_under_load(path, two, duration * 2)
    print(row, flush=True)
    rows.append(row)
    return rows
