"""asyncio (and uvloop) specifics of loop delivery: futures settled by `call_soon_threadsafe`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class AsyncioWaiter:
    """A one-shot result slot awaited by one asyncio task."""

    __slots__ = ("_future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._future = loop.create_future()

    async def wait(self) -> Any:
        return await self._future

    def settle(self, result: Any, error: BaseException | None) -> bool:
        """Complete the wait (on the loop's thread); False when it was cancelled already."""
        fut = self._future
        if fut.done():
            return False
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
        return True


class AsyncioLoop:
    """A running asyncio loop as a delivery target for worker threads."""

    __slots__ = ("_loop",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def waiter(self) -> AsyncioWaiter:
        return AsyncioWaiter(self._loop)

    def post(self, fn: Callable[[Any], object], arg: Any) -> bool:
        """Schedule `fn(arg)` on the loop from any thread; False if the loop has closed."""
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            return False
        return True


_last: AsyncioLoop | None = None


def current() -> AsyncioLoop | None:
    global _last
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    cached = _last
    if cached is not None and cached._loop is loop:
        return cached
    _last = AsyncioLoop(loop)
    return _last
