"""asyncio (and uvloop) specifics of loop delivery: futures settled by `call_soon_threadsafe`."""

from __future__ import annotations

import asyncio
import functools
import types
from asyncio.events import _get_running_loop  # C-accelerated, returns None off-loop
from collections.abc import Callable, Generator, Iterable
from threading import get_ident
from typing import TYPE_CHECKING, Any

from .mailbox import Mailbox
from .sched import shorten_slice

if TYPE_CHECKING:
    from .abc import Outcome


@types.coroutine
def _yield_once() -> Generator[None, None, None]:
    """A bare yield: the task is stepped again once the loop's ready callbacks have run."""
    yield


class AsyncioLoop:
    """A running asyncio loop as a delivery target for worker threads; its waiters are plain
    futures of the loop (a cancelled task cancels its future, so settling finds it done)."""

    __slots__ = ("loop", "waiter", "exact", "soon", "send")
    checkpoint = staticmethod(_yield_once)
    kind = "asyncio"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: a stdlib loop, whose `_thread_id` says which thread runs it
        self.exact = isinstance(loop, asyncio.BaseEventLoop)
        # No Python frame per call: a stdlib loop's `create_future` is a Python method that
        # makes the C future; make it directly.
        self.waiter: Callable[[], asyncio.Future[Any]] = (
            functools.partial(asyncio.Future, loop=loop) if self.exact else loop.create_future)
        #: after the callbacks already scheduled, so after the tasks that are ready now
        self.soon: Callable[[Callable[[Any], object], Any], object] = loop.call_soon
        self.send: Callable[[Callable[[Any], object], Any], None] = Mailbox(self.post).send

    @staticmethod
    def settle_all(items: Iterable[Outcome]) -> None:
        for item in items:
            fut = item.waiter
            if fut.done():  # its task was cancelled
                continue
            if item.error is None:
                fut.set_result(item.result)
            else:
                fut.set_exception(item.error)

    def post(self, fn: Callable[[Any], object], arg: Any) -> bool:
        try:
            self.loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            return False
        return True


_by_thread: dict[int, AsyncioLoop] = {}


def current() -> AsyncioLoop | None:
    """The running asyncio loop of this thread, wrapped; None if there is none.

    Called per request: asyncio's own lookup makes a `getpid()` system call each time, so a
    stdlib loop is found by thread id instead, checked against the thread it is running in."""
    ident = get_ident()
    cached = _by_thread.get(ident)
    if cached is not None and cached.exact and cached.loop._thread_id == ident:  # type: ignore[attr-defined]
        return cached
    loop = _get_running_loop()
    if loop is None:
        return None
    if cached is not None and cached.loop is loop:  # a loop that does not record its thread
        return cached
    wrapped = AsyncioLoop(loop)
    shorten_slice()  # this is the loop's thread (`sched`)
    if len(_by_thread) >= 256:
        _by_thread.clear()
    _by_thread[ident] = wrapped
    return wrapped
