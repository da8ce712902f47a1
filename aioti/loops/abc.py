"""What the rest of aioti needs of an event loop, as protocols: a loop that worker threads can
deliver to, the one-shot slot a task awaits, and the finished work a worker hands back.

The implementations (`_asyncio`, `_trio`) depend on this module; nothing depends back on them
but the picker (`aioti.loops.current_loop`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Iterable
from typing import Any, Protocol

__all__ = ["Loop", "Outcome", "Waiter"]


class Waiter(Protocol):
    """A one-shot result slot, awaited (once) by one task of its loop."""

    def __await__(self) -> Generator[Any, None, Any]: ...

    def done(self) -> bool:
        """Settled, or its wait was cancelled."""
        ...


class Outcome(Protocol):
    """A finished piece of work as a worker hands it back: whom to wake, and with what."""

    waiter: Any
    result: Any
    error: BaseException | None


class Loop(Protocol):
    """A running event loop, seen from worker threads."""

    #: "asyncio" (uvloop included) or "trio"
    kind: str

    def waiter(self) -> Waiter:
        """A new slot for a task of this loop to await."""
        ...

    def settle_all(self, items: Iterable[Outcome]) -> None:
        """On the loop's thread: complete each item's waiter with its result or error (a waiter
        whose task stopped waiting is skipped)."""
        ...

    def post(self, fn: Callable[[Any], object], arg: Any) -> bool:
        """From any thread: run `fn(arg)` on the loop soon; False if the loop has closed."""
        ...

    def send(self, fn: Callable[[Any], object], items: list[Outcome]) -> None:
        """From any thread: `post` of `fn(items)`, a delivery of finished work, merged: the
        calls sent while one wake-up of the loop is pending ride on it (`mailbox.Mailbox`), in
        the order sent; a closed loop drops them. A wait whose outcome was sent before its
        cancellation ran gets the outcome (the cancellation lands at its next checkpoint):
        asyncio runs the callbacks posted before a loop iteration ahead of the timers due in
        it, and a trio wait refuses the abort once its outcome is sent."""
        ...

    def soon(self, fn: Callable[[Any], object], arg: Any) -> object:
        """On the loop's thread: run `fn(arg)` once the tasks that are ready now have run."""
        ...

    def checkpoint(self) -> Awaitable[None]:
        """Awaited by a task of this loop: let the tasks that are ready now run first (and a
        cancellation land), then go on."""
        ...
