"""An async lock that works across event loops (asyncio and trio, in any threads).

`anyio.Lock` belongs to one loop; a model may be used from several. This lock keeps its state
under a thread lock and parks waiters on their own loops; ownership passes FIFO. A waiter
cancelled after being handed the lock passes it on, so cancellation never leaks the lock.
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType

from .loops import Loop, Waiter, current_loop, wake

__all__ = ["CrossLoopLock"]


class CrossLoopLock:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locked = False
        self._waiters: deque[tuple[Loop, Waiter]] = deque()

    def locked(self) -> bool:
        return self._locked

    async def acquire(self) -> None:
        with self._mutex:
            if not self._locked:
                self._locked = True
                return
            loop = current_loop()
            entry = (loop, loop.waiter())
            self._waiters.append(entry)
        try:
            await entry[1]  # settled only when ownership is handed to us
        except BaseException:
            with self._mutex:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                    raise
            self.release()  # handed over while we were being cancelled: pass it on
            raise

    def release(self) -> None:
        with self._mutex:
            if not self._locked:
                raise RuntimeError("release of an unlocked CrossLoopLock")
            if not self._waiters:
                self._locked = False
                return
            loop, waiter = self._waiters.popleft()
        if not wake(loop, waiter):
            self.release()  # that waiter's loop is gone

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
