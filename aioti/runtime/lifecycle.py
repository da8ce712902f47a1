"""The process around the runtimes: stop every live one at interpreter exit, and close every
one inherited through a `fork()` (its worker threads did not come along).

Anything with `shutdown(wait=...)` and `orphaned()` registers itself with `track`.
"""

from __future__ import annotations

import atexit
import os
import weakref
from typing import Protocol

__all__ = ["FORKED", "forget", "track"]

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


@atexit.register
def _stop_all_at_exit() -> None:
    """Stop every runtime's workers before interpreter shutdown joins threads."""
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
