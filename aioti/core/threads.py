"""The size of the OpenMP team a thread's native runs fork, set for that thread only, and the
per-batch choice of that size for a model's workers.

A CPU model library parallelizes its kernels with OpenMP (`#pragma omp parallel`, team size from
the calling thread's `nthreads` setting). `torch.set_num_threads` would also change process-wide
state (the default for threads torch initializes later, the pthreadpool), so aioti calls the
OpenMP runtime's `omp_set_num_threads` directly: it applies to the calling thread alone.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["ThreadTeams", "set_thread_team_size", "thread_team_size"]


@functools.cache
def _omp(name: str) -> Any:
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError):
        return None


def thread_team_size() -> int | None:
    """The team size of parallel regions the calling thread would start now; None when no
    OpenMP runtime is loaded."""
    getter = _omp("omp_get_max_threads")
    return None if getter is None else int(getter())


def set_thread_team_size(n: int) -> bool:
    """Make parallel regions started by the calling thread use `n` threads; False when no
    OpenMP runtime is loaded in this process (nothing to set)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    setter = _omp("omp_set_num_threads")
    if setter is None:
        return False
    setter(n)
    return True


class ThreadTeams:
    """A model's worker team sizes: `alone` threads for a batch that runs while no other batch
    of the model does (a lone request gets every core), `shared` while others run too (busy
    workers do not oversubscribe the cores). Set before each batch, in the worker's thread, and
    only when it changes."""

    def __init__(self, alone: int, shared: int) -> None:
        if alone < 1 or shared < 1:
            raise ValueError(f"threads must be >= 1, got {alone} and {shared}")
        self.alone = alone
        self.shared = shared
        self._current = threading.local()

    def size(self, busy: int) -> int:
        """The team size for a batch while `busy` batches of the model run (this one included)."""
        return self.alone if busy <= 1 else self.shared

    def before_batch(self, busy: int) -> None:
        """In a worker, before a batch; `busy` counts the model's batches running, this one
        included (plus one when requests wait for another worker)."""
        n = self.size(busy)
        if getattr(self._current, "size", None) != n:
            set_thread_team_size(n)
            self._current.size = n

    @contextmanager
    def borrowed(self, busy: int) -> Iterator[None]:
        """For a batch run on a thread that is not a worker's (an event loop's, with on-loop
        batching): its team size chosen as in `before_batch`, and the thread's own restored
        afterwards (its other parallel work keeps the size it had)."""
        n = self.size(busy)
        own = thread_team_size()
        if own is None or own == n:
            yield
            return
        set_thread_team_size(n)
        try:
            yield
        finally:
            set_thread_team_size(own)

    def __repr__(self) -> str:
        return f"ThreadTeams(alone={self.alone}, shared={self.shared})"
