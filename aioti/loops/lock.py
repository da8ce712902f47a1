"""An async lock that works across event loops (asyncio and trio, in any threads).

`anyio.Lock` belongs to one loop; a model may be used from several. This lock keeps its state
under a thread lock and parks waiters in a `ParkingLot`; ownership passes FIFO. A waiter
cancelled after being handed the lock passes it on, so cancellation never leaks the lock.
"""

from __future__ import annotations

import threading
from types import TracebackType

from .parking import ParkingLot

__all__ = ["CrossLoopLock"]


class CrossLoopLock:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locked = False
        self._lot = ParkingLot()

    async def acquire(self) -> None:
        with self._mutex:
            if not self._locked:
                self._locked = True
                return
            ticket = self._lot.park()
        # Unparked only when ownership is handed over; cancelled after that, pass it on.
        await self._lot.wait(ticket, on_lost_turn=self.release)

    def release(self) -> None:
        with self._mutex:
            if not self._locked:
                raise RuntimeError("release of an unlocked CrossLoopLock")
            if not self._lot.unpark(1):
                self._locked = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
