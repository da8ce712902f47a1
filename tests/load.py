"""Helpers for tests that drive a model with many concurrent callers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import anyio


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
