"""asyncio (and uvloop) specifics of loop delivery: futures settled by `call_soon_threadsafe`."""

from __future__ import annotations

import asyncio
from asyncio.events import _get_running_loop  # C-accelerated, returns None off-loop
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loops import Outcome


class AsyncioLoop:
    """A running asyncio loop as a delivery target for worker threads; its waiters are plain
    futures of the loop (a cancelled task cancels its future, so settling finds it done)."""

    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def waiter(self) -> asyncio.Future[Any]:
        return self._loop.create_future()

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

    @staticmethod
    def settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> bool:
        if fut.done():
            return False
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
        return True

    def post(self, fn: Callable[[Any], object], arg: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            return False
        return True


_last: AsyncioLoop | None = None


def current() -> AsyncioLoop | None:
    """The running asyncio loop of this thread, wrapped (None, without raising, if none)."""
    global _last
    loop = _get_running_loop()
    if loop is None:
        return None
    cached = _last
    if cached is not None and cached._loop is loop:
        return cached
    _last = AsyncioLoop(loop)
    return _last
