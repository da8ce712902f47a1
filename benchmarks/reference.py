"""Reference batchers for the on-loop batching rows: the least an event loop can do to batch
concurrent calls, as a floor to read aioti's rows against (same run, same model, same core).

Each is what a hand-written batcher for one loop needs and no more: a call appends its input
and a waiter and schedules one flush per batch; the flush concatenates, runs the model through
aioti's ctypes core on the loop's thread, splits the output and wakes each caller with its row.
No input checks, no cancellation handling, no queue bound, no stats, no second loop: what
aioti's on-loop batching does beside the run is the difference between the two rows.
"""

from __future__ import annotations

from typing import Any

import torch


class AsyncioReference:
    """`run(inputs)`: one call's rows through a shared flush, on the running asyncio loop."""

    def __init__(self, core: Any, max_rows: int) -> None:
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._run = core.run_tensors
        self._max = max_rows
        self._xs: list[torch.Tensor] = []
        self._waiters: list[Any] = []

    async def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        fut = self._loop.create_future()
        self._xs.append(inputs[0])
        self._waiters.append(fut)
        if len(self._waiters) == 1:
            self._loop.call_soon(self._flush)
        return await fut  # type: ignore[no-any-return]

    def _flush(self) -> None:
        xs, waiters = self._xs[:self._max], self._waiters[:self._max]
        del self._xs[:self._max], self._waiters[:self._max]
        if self._waiters:
            self._loop.call_soon(self._flush)
        out = self._run([torch.cat(xs)], None)[0]
        for fut, row in zip(waiters, out.split([x.shape[0] for x in xs])):
            fut.set_result([row])


class TrioReference:
    """The same on trio: callers park with `wait_task_rescheduled`, a system task flushes."""

    def __init__(self, core: Any, max_rows: int) -> None:
        import trio

        self._trio = trio
        self._run = core.run_tensors
        self._max = max_rows
        self._xs: list[torch.Tensor] = []
        self._tasks: list[Any] = []
        self._token = trio.lowlevel.current_trio_token()

    async def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        lowlevel = self._trio.lowlevel
        self._xs.append(inputs[0])
        self._tasks.append(lowlevel.current_task())
        if len(self._tasks) == 1:
            self._token.run_sync_soon(self._flush)
        return await lowlevel.wait_task_rescheduled(  # type: ignore[no-any-return]
            lambda _: lowlevel.Abort.FAILED)

    def _flush(self) -> None:
        from outcome import Value

        xs, tasks = self._xs[:self._max], self._tasks[:self._max]
        del self._xs[:self._max], self._tasks[:self._max]
        if self._tasks:
            self._token.run_sync_soon(self._flush)
        out = self._run([torch.cat(xs)], None)[0]
        reschedule = self._trio.lowlevel.reschedule
        for task, row in zip(tasks, out.split([x.shape[0] for x in xs])):
            reschedule(task, Value([row]))
