"""The event loop a coroutine runs in, as a target that worker threads can deliver results to.

Every request carries the loop of the task that made it, so one model serves tasks of several
loops (asyncio and trio, in several threads) at once. Each backend's specifics live in its own
module (`_asyncio`, `_trio`); this one only picks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

from . import _asyncio

__all__ = ["Loop", "Waiter", "current_loop", "wake"]


class Waiter(Protocol):
    """A one-shot result slot: awaited by one task, settled on that task's loop thread."""

    async def wait(self) -> Any: ...

    def settle(self, result: Any, error: BaseException | None) -> bool: ...


class Loop(Protocol):
    """A running event loop, seen from worker threads."""

    def waiter(self) -> Waiter: ...

    def post(self, fn: Callable[[Any], object], arg: Any) -> bool: ...


def current_loop() -> Loop:
    """The loop of the calling coroutine (asyncio, uvloop or trio)."""
    loop: Loop | None = None
    if "trio" in sys.modules:  # checked first: under trio, asyncio's lookup costs an exception
        from . import _trio

        loop = _trio.current()
    if loop is None:
        loop = _asyncio.current()
    if loop is None:
        raise RuntimeError("aioti must be awaited from a running asyncio or trio event loop")
    return loop


def _release(waiter: Waiter) -> None:
    waiter.settle(None, None)


def wake(loop: Loop, waiter: Waiter) -> bool:
    """From any thread: let a parked waiter resume (with None); False if its loop is gone."""
    return loop.post(_release, waiter)
