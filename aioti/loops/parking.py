"""`ParkingLot`: tasks of any event loops, in any threads, parked in FIFO order until woken.

trio's `ParkingLot` is the model: one primitive under the waits that need a queue of tasks (a
lock, room in a bounded queue, a single-flight initialization). The owner keeps its own state
under its own thread lock and parks a task when that state says it must wait; a waker changes
the state, then unparks. Since a task registers (`park`) while its owner's lock is held, before
it awaits, no wake-up is lost between the check and the wait.
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from . import current_loop, deliver
from .abc import Loop, Waiter

__all__ = ["ParkingLot", "Ticket"]


class Ticket:
    """One parked task: its loop and the slot it awaits."""

    __slots__ = ("loop", "waiter")

    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.waiter: Waiter = loop.waiter()


class ParkingLot:
    """Parked tasks, woken first in, first out, each on its own loop."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._parked: deque[Ticket] = deque()

    def __len__(self) -> int:
        return len(self._parked)

    def park(self) -> Ticket:
        """Register the calling task (on its loop); then `await lot.wait(ticket)`."""
        ticket = Ticket(current_loop())
        with self._mutex:
            self._parked.append(ticket)
        return ticket

    def leave(self, ticket: Ticket) -> bool:
        """Take `ticket` out of the lot without waiting (the reason to wait went away); False
        when it was unparked already."""
        with self._mutex:
            try:
                self._parked.remove(ticket)
            except ValueError:
                return False
        return True

    async def wait(self, ticket: Ticket, *, on_lost_turn: Callable[[], object] | None = None
                   ) -> Any:
        """Wait until `ticket` is unparked; returns the value it was unparked with (or raises
        its error). A task cancelled while parked leaves the lot; one cancelled after it was
        unparked holds a turn it will not use, and `on_lost_turn()` passes that on."""
        try:
            return await ticket.waiter
        except BaseException:
            with self._mutex:
                try:
                    self._parked.remove(ticket)
                    lost = False
                except ValueError:
                    lost = True
            if lost and on_lost_turn is not None:
                on_lost_turn()
            raise

    def unpark(self, count: int = 1, result: Any = None, error: BaseException | None = None
               ) -> int:
        """From any thread: wake up to `count` parked tasks, oldest first, with `result` (or
        `error`); returns how many were woken (tasks of loops that have closed are dropped)."""
        woken = 0
        while woken < count:
            with self._mutex:
                if not self._parked:
                    break
                ticket = self._parked.popleft()
            if deliver(ticket.loop, ticket.waiter, result, error):
                woken += 1
        return woken

    def unpark_all(self, result: Any = None, error: BaseException | None = None) -> int:
        """Wake every parked task (see `unpark`)."""
        return self.unpark(sys.maxsize, result, error)
