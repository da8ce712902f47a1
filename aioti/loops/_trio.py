"""trio specifics of loop delivery: tasks parked and rescheduled through the run's token."""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterable
from typing import TYPE_CHECKING, Any

import outcome
import trio

from .mailbox import Mailbox
from .sched import shorten_slice

if TYPE_CHECKING:
    from .abc import Outcome


class TrioWaiter:
    """A one-shot result slot awaited by one trio task. Once its outcome is sent to the loop
    (`TrioLoop.send`), a cancellation of the wait is refused (`Abort.FAILED`, as for an
    operation that completed): the task resumes with the outcome, and the cancellation lands
    at its next checkpoint."""

    __slots__ = ("_task", "_outcome", "_state", "sent")

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None
        self._outcome: outcome.Outcome | None = None
        self._state = 0  # 0 pending, 1 settled, 2 cancelled
        #: its outcome is on its way (set by the delivering thread)
        self.sent = False

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        if self._outcome is not None:  # settled before anyone waited
            await trio.lowlevel.checkpoint()
            return self._outcome.unwrap()
        self._task = trio.lowlevel.current_task()
        return await trio.lowlevel.wait_task_rescheduled(self._abort)

    def done(self) -> bool:
        """Settled, or its wait was cancelled."""
        return self._state != 0

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        if self.sent:  # the delivery that settles it is posted: it resumes the task
            return trio.lowlevel.Abort.FAILED
        self._state = 2
        return trio.lowlevel.Abort.SUCCEEDED

    def settle(self, result: Any, error: BaseException | None) -> bool:
        """Complete the wait (on trio's thread); False when it was cancelled already."""
        if self._state:
            return False
        self._state = 1
        value = outcome.Error(error) if error is not None else outcome.Value(result)
        if self._task is None:
            self._outcome = value
        else:
            trio.lowlevel.reschedule(self._task, value)
        return True


class TrioLoop:
    """A running trio run as a delivery target for worker threads."""

    __slots__ = ("_token", "_send")
    kind = "trio"
    checkpoint = staticmethod(trio.lowlevel.checkpoint)

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._send: Callable[[Callable[[Any], object], Any], None] = Mailbox(self.post).send

    def waiter(self) -> TrioWaiter:
        return TrioWaiter()

    @staticmethod
    def settle_all(items: Iterable[Outcome]) -> None:
        for item in items:
            item.waiter.settle(item.result, item.error)

    def send(self, fn: Callable[[Any], object], items: list[Outcome]) -> None:
        for item in items:
            item.waiter.sent = True  # before the post: an abort from now on is refused
        self._send(fn, items)

    def post(self, fn: Callable[[Any], object], arg: Any) -> bool:
        try:
            self._token.run_sync_soon(fn, arg)
        except trio.RunFinishedError:
            return False
        return True

    def soon(self, fn: Callable[[Any], object], arg: Any) -> None:
        # Run by trio's system task for such calls, which runs after the tasks now runnable.
        self._token.run_sync_soon(fn, arg)


_cache = threading.local()


def current() -> TrioLoop | None:
    """The trio run of the calling task, wrapped; None outside a trio task. (A task, not a run:
    in a trio guest run the host loop's own tasks, asyncio's, run in the same thread while it
    is on.)"""
    if not trio.lowlevel.in_trio_task():
        return None
    token = trio.lowlevel.current_trio_token()
    loop: TrioLoop | None = getattr(_cache, "loop", None)
    if loop is None or loop._token is not token:
        loop = _cache.loop = TrioLoop(token)
        shorten_slice()  # this is the run's thread (`sched`)
    return loop
