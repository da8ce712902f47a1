"""The bottom layer: event loops as targets that worker threads deliver results to.

Every request carries the loop of the task that made it, so one model serves tasks of several
loops (asyncio and trio, in several threads) at once. The protocols are in `abc`, each loop kind
in its own module (`_asyncio`, `_trio`); this module picks one by name. `ParkingLot` parks tasks
of any loops, and `CrossLoopLock` is built on it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from . import _asyncio
from .abc import Loop, Outcome, Waiter

__all__ = ["Loop", "Outcome", "Waiter", "current_loop", "deliver", "wake"]


def current_loop() -> Loop:
    """The loop of the calling coroutine (asyncio, uvloop or trio)."""
    if "trio" in sys.modules:  # first: a trio guest run's tasks also see asyncio's host loop
        loop = (_trio_current or _load_trio())()
        if loop is not None:
            return loop
    found = _asyncio.current()
    if found is None:
        raise RuntimeError("aioti must be awaited from a running asyncio or trio event loop")
    return found


_trio_current: Callable[[], Loop | None] | None = None


def _load_trio() -> Callable[[], Loop | None]:
    """trio's lookup, imported once trio is (not an import statement per request)."""
    global _trio_current
    from . import _trio

    _trio_current = _trio.current
    return _trio_current


class _Delivery:
    """One `Outcome`, for a waiter completed on its own (off the runtime's hot path)."""

    __slots__ = ("loop", "waiter", "result", "error")

    def __init__(self, loop: Loop, waiter: Waiter, result: Any, error: BaseException | None
                 ) -> None:
        self.loop, self.waiter, self.result, self.error = loop, waiter, result, error

    def settle(self) -> None:
        self.loop.settle_all((self,))


def deliver(loop: Loop, waiter: Waiter, result: Any, error: BaseException | None = None) -> bool:
    """From any thread: complete a waiter on its own loop; False if that loop is gone."""
    return loop.post(_Delivery.settle, _Delivery(loop, waiter, result, error))


def wake(loop: Loop, waiter: Waiter) -> bool:
    """From any thread: let a parked waiter resume (with None); False if its loop is gone."""
    return deliver(loop, waiter, None)
