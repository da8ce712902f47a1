"""The process around the runtimes: stop every live one at interpreter exit, and close every
one inherited through a `fork()` (its worker threads did not come along).

Anything with `shutdown(wait=...)` and `orphaned()` registers itself with `track`. Blocking
work that must not be cut short by the interpreter's finalization (a constant operation runs
torch ops in a thread) runs inside `operation()`: none starts once exit has begun, and the exit
hook waits for those in progress before it stops the runtimes.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from ..errors import ClosedError

__all__ = ["EXITING", "FORKED", "forget", "operation", "track"]

EXITING = "the interpreter is exiting: no model operation starts any more"

#: seconds the exit hook waits for operations in progress
EXIT_WAIT_S = 30.0

FORKED = ("the model was loaded before this process was forked, and its worker threads did not "
          "survive the fork: load it again in this process")


class Stoppable(Protocol):
    def shutdown(self, *, cancel_queued: bool = False, wait: float | None = None) -> None: ...

    def orphaned(self) -> None: ...


_live: weakref.WeakSet[Stoppable] = weakref.WeakSet()


def track(runtime: Stoppable) -> None:
    _live.add(runtime)


def forget(runtime: Stoppable) -> None:
    _live.discard(runtime)


_ops = threading.Condition()
_running_ops = 0
_exiting = False


@contextmanager
def operation() -> Iterator[None]:
    """Blocking work the exit hook waits for; `ClosedError` once exit has begun."""
    global _running_ops
    with _ops:
        if _exiting:
            raise ClosedError(EXITING)
        _running_ops += 1
    try:
        yield
    finally:
        with _ops:
            _running_ops -= 1
            _ops.notify_all()


@atexit.register
def _stop_all_at_exit() -> None:
    """Refuse new operations, wait for those in progress, then stop every runtime's workers,
    before interpreter shutdown joins threads."""
    global _exiting
    with _ops:
        _exiting = True
        _ops.wait_for(lambda: _running_ops == 0, EXIT_WAIT_S)
    for r in list(_live):
        r.shutdown(wait=5.0)


def _after_fork_in_child() -> None:
    """In the child, every model loaded before the fork refuses requests at once instead of
    queueing them for no one (a hang)."""
    for r in list(_live):
        r.orphaned()
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
