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


class _Reference:
    """The batching shared by both loops; a loop's kind gives how a flush is scheduled
    (`soon`) and says how a waiter is woken with its outputs (`_wake`)."""

    def __init__(self, core: Any, max_rows: int, soon: Any) -> None:
        self._run = core.run_tensors
        self._soon = soon
        self._max = max_rows
        self._xs: list[torch.Tensor] = []
        self._waiters: list[Any] = []

    def _add(self, x: torch.Tensor, waiter: Any) -> None:
        self._xs.append(x)
        self._waiters.append(waiter)
        if len(self._waiters) == 1:
            self._soon(self._flush)

    def _flush(self) -> None:
        xs, waiters = self._xs[:self._max], self._waiters[:self._max]
        del self._xs[:self._max], self._waiters[:self._max]
        if self._waiters:
            self._soon(self._flush)
        out = self._run([torch.cat(xs)], None)[0]
        wake = self._wake
        for waiter, row in zip(waiters, out.split([x.shape[0] for x in xs])):
            wake(waiter, [row])

    def _wake(self, waiter: Any, outputs: list[torch.Tensor]) -> None:
        raise NotImplementedError


class AsyncioReference(_Reference):
    """`run(inputs)` on the running asyncio loop: callers await a future each."""

    def __init__(self, core: Any, max_rows: int) -> None:
        import asyncio

        self._loop = asyncio.get_running_loop()
        super().__init__(core, max_rows, self._loop.call_soon)

    async def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        fut = self._loop.create_future()
        self._add(inputs[0], fut)
        return await fut  # type: ignore[no-any-return]

    def _wake(self, waiter: Any, outputs: list[torch.Tensor]) -> None:
        waiter.set_result(outputs)


class TrioReference(_Reference):
    """The same on trio: callers park with `wait_task_rescheduled`."""

    def __init__(self, core: Any, max_rows: int) -> None:
        import trio
        from outcome import Value

        super().__init__(core, max_rows, trio.lowlevel.current_trio_token().run_sync_soon)
        self._lowlevel = trio.lowlevel
        self._value = Value

    async def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        lowlevel = self._lowlevel
        self._add(inputs[0], lowlevel.current_task())
        return await lowlevel.wait_task_rescheduled(  # type: ignore[no-any-return]
            lambda _: lowlevel.Abort.FAILED)

    def _wake(self, waiter: Any, outputs: list[torch.Tensor]) -> None:
        self._lowlevel.reschedule(waiter, self._value(outputs))
