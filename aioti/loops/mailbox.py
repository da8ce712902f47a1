"""`Mailbox`: calls posted to one event loop from worker threads, several to one wake-up.

Each post to a loop (`call_soon_threadsafe`, trio's `run_sync_soon`) writes a byte to the
loop's wake-up socket: a system call on the posting thread that lets go of the GIL, and a
wake-up of the loop. A mailbox queues the calls and posts one drain while none is pending, so
while the loop is busy, deliveries from any number of workers ride on one wake-up and no
worker lets go of the GIL to post. Calls run on the loop in the order they were posted.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Mailbox"]


class Mailbox:
    """Posts `fn(arg)` calls to a loop through `post` (the loop's exact post), merged."""

    __slots__ = ("_calls", "_pending", "_post")

    def __init__(self, post: Callable[[Callable[[Any], object], Any], bool]) -> None:
        self._calls: deque[tuple[Callable[[Any], object], Any]] = deque()
        self._pending = False
        self._post = post

    def send(self, fn: Callable[[Any], object], arg: Any) -> None:
        """From any thread: run `fn(arg)` on the loop soon, after the calls sent before it. A
        loop that has closed drops it."""
        self._calls.append((fn, arg))
        if not self._pending:
            # Two threads may both post here: the second drain finds nothing, which is harmless.
            self._pending = True
            if not self._post(self._drain, None):
                self._pending = False  # closed: nothing will drain; later sends try again
                self._calls.clear()

    def _drain(self, _: object = None) -> None:
        """On the loop: run the calls queued so far, and those sent while they run."""
        # Cleared first: a call sent from now on either runs in this drain or posts its own.
        self._pending = False
        calls = self._calls
        while calls:
            fn, arg = calls.popleft()
            try:
                fn(arg)
            except BaseException:
                if calls:  # the rest still run, in a drain of their own
                    self._pending = True
                    self._post(self._drain, None)
                raise
