"""Helpers for tests that drive a model with many concurrent callers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from aioti.backends.cpu import CpuBackend


def record_run_threads(model: Any) -> list[int]:
    """The idents of the threads the model's runs happen on, appended as they run (a plain
    model's executor, recording around its `run_many`)."""
    executor = model._dispatcher.runner._executor
    run_many = executor._run_many
    threads: list[int] = []

    def recording(batch: Any, stream: Any) -> Any:
        threads.append(threading.get_ident())
        return run_many(batch, stream)

    executor._run_many = recording
    return threads


class FlakyCpuBackend(CpuBackend):
    """The CPU, but every batch fails (as a lost device would) while `broken` is set."""

    broken = threading.Event()

    def begin_batch(self, ctx: Any, readies: Any) -> Any:
        if self.broken.is_set():
            raise RuntimeError("device lost")
        return super().begin_batch(ctx, readies)


def break_workers(*dispatchers: Any, index: int | None = None) -> None:
    """Make each dispatcher's workers (or only its worker `index`) fail, as a fault of the
    runtime's own would: injected where a worker takes its next batch (one already waiting for
    a batch takes that first)."""
    for d in dispatchers:
        real_take = d.queue.take

        def take(i: int, in_flight: bool, real_take: Any = real_take) -> Any:
            if index is None or i == index:
                raise RuntimeError("injected into the queue")
            return real_take(i, in_flight)

        d.queue.take = take


async def load_until_unhealthy(model: Any, x: Any, *, bound_s: float = 60) -> int:
    """Call `model(x)` 16 at a time (some reach a worker, not only the caller's thread) until
    the model is no longer healthy; returns how many calls were refused (`ClosedError`)."""
    from aioti import ClosedError

    refused = 0

    async def one() -> None:
        nonlocal refused
        try:
            await model(x)
        except ClosedError:
            refused += 1

    with anyio.fail_after(bound_s):
        while model.healthy:
            async with anyio.create_task_group() as tg:
                for _ in range(16):
                    tg.start_soon(one)
    return refused


async def call_all(model: Any, xs: Sequence[Any]) -> list[Any]:
    """`model(x)` for every `x`, all at once (a task each); the results in order."""
    out: list[Any] = [None] * len(xs)

    async def call(i: int) -> None:
        out[i] = await model(xs[i])

    async with anyio.create_task_group() as tg:
        for i in range(len(xs)):
            tg.start_soon(call, i)
    return out


async def swap_under_load(model: Any, xs: Sequence[Any], before: Sequence[Any],
                          after: Sequence[Any], weights: Any,
                          close: Callable[[Any, Any], bool]) -> tuple[list[int], list[int]]:
    """Call the model on every `x` at once (staggered a little) while `model.hot_swap(weights)`
    runs. Returns the calls whose output was neither `before[i]` nor `after[i]` (torn), and
    those that started after the swap returned yet saw the old weights (late)."""
    torn: list[int] = []
    late: list[int] = []
    swapped = anyio.Event()

    async def call(i: int) -> None:
        await anyio.sleep(i * 1e-4)
        started_after = swapped.is_set()
        out = await model(xs[i])
        if not (close(out, before[i]) or close(out, after[i])):
            torn.append(i)
        elif started_after and not close(out, after[i]):
            late.append(i)

    async def swap() -> None:
        await anyio.sleep(0.002)
        await model.hot_swap(weights)
        swapped.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(swap)
        for i in range(len(xs)):
            tg.start_soon(call, i)
    return torn, late


async def call_from_three_loops(model: Any, eager: Any, callers: int,
                                rows: Callable[[int], int], timeout: float
                                ) -> dict[str, list[bool]]:
    """`callers` tasks on this loop, on an asyncio loop and on a trio loop in two other threads,
    all at once, each calling `model` 20 times on inputs of its own (`rows(i)` rows); whether
    each output matched `eager`, by loop ("here", "asyncio", "trio")."""
    import asyncio

    import torch
    import trio

    async def clients(tag: int) -> list[bool]:
        ok: list[bool] = []

        async def one(i: int) -> None:
            x = torch.full((rows(i), 64), float(tag * 100 + i)) / 1000
            for _ in range(20):
                ok.append(torch.allclose(await model(x), eager(x), atol=1e-4))

        async with anyio.create_task_group() as tg:
            for i in range(callers):
                tg.start_soon(one, i)
        return ok

    results: dict[str, list[bool]] = {}
    threads = [
        threading.Thread(target=lambda: results.update(asyncio=asyncio.run(clients(1)))),
        threading.Thread(target=lambda: results.update(trio=trio.run(clients, 2))),
    ]
    for t in threads:
        t.start()
    with anyio.fail_after(timeout):
        results["here"] = await clients(3)
        while any(t.is_alive() for t in threads):
            await anyio.sleep(0.01)
    return results
