"""The size of the OpenMP team a thread's native runs fork, set for that thread only, and the
per-batch choice of that size for a model's threads.

A CPU model library parallelizes its kernels with OpenMP (`#pragma omp parallel`, team size from
the calling thread's `nthreads` setting). `torch.set_num_threads` would also change process-wide
state (the default for threads torch initializes later, the pthreadpool), so aioti calls the
OpenMP runtime's `omp_set_num_threads` directly: it applies to the calling thread alone.

libgomp (torch's OpenMP runtime) gives every thread that forks a team a pool of threads of its
own, and keeps it for the thread's life. Once the pools hold more threads than the process has
cores, every team sleeps at its barriers instead of spinning, and each parallel region pays
futex wake-ups: a mid-size MLP run takes twice as long, and stays so. Hence one rule: of a
model's threads, only its lead worker forks teams wider than `others` threads (one by default,
which forks no pool); the other workers, the loop's thread in on-loop runs, and the helper
threads of loads and constant operations (`team_of_one`) stay within it.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["ThreadTeams", "set_thread_team_size", "team_of_one", "thread_team_size"]


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


_initialized = threading.local()


def _torch_thread_init() -> None:
    """Have torch initialize this thread's OpenMP setting now (`at::get_num_threads` does it
    once per thread, lazily): later, it would overwrite the size set here."""
    if not getattr(_initialized, "done", False):
        torch.get_num_threads()
        _initialized.done = True


def _lend(n: int) -> int | None:
    """Size the calling thread's team to `n` for a while; returns its own size, to set back
    afterwards (None: nothing to set back)."""
    _torch_thread_init()
    own = thread_team_size()
    if own is None or own == n:
        return None
    set_thread_team_size(n)
    return own


@contextmanager
def team_of_one() -> Iterator[None]:
    """Native work on a thread that is no model's lead (a load, a probe run, constant folding
    in a helper thread) forks no OpenMP team: the thread's own size restored afterwards."""
    own = _lend(1)
    try:
        yield
    finally:
        ThreadTeams.give_back(own)


class ThreadTeams:
    """A model's team sizes, by thread: its lead worker uses `alone` threads for a batch that
    runs while no other batch of the model does (a lone request gets every core), `shared`
    while others run too (busy workers do not oversubscribe the cores); every other thread
    that runs the model uses `others`. Set before each batch, in the running thread, and only
    when it changes."""

    def __init__(self, alone: int, shared: int, others: int | None = None) -> None:
        others = shared if others is None else others
        if min(alone, shared, others) < 1:
            raise ValueError(f"threads must be >= 1, got {alone}, {shared} and {others}")
        self.alone = alone
        self.shared = shared
        self.others = others
        self._current = threading.local()

    def enter(self, lead: bool) -> None:
        """In a worker thread, once before its first batch: whether it is the model's lead."""
        _torch_thread_init()
        self._current.lead = lead

    def size(self, busy: int, lead: bool = True) -> int:
        """The team size for a batch while `busy` batches of the model run (this one included),
        on the lead's thread or another's."""
        if not lead:
            return self.others
        return self.alone if busy <= 1 else self.shared

    def before_batch(self, busy: int) -> None:
        """In a worker, before a batch; `busy` counts the model's batches running, this one
        included (plus one when requests wait for another worker)."""
        current = self._current
        n = self.size(busy, getattr(current, "lead", True))
        if getattr(current, "size", None) != n:
            set_thread_team_size(n)
            current.size = n

    def borrow(self) -> int | None:
        """For a run on a thread that is not a worker's (an event loop's): size its team as a
        thread other than the lead; returns the thread's own size to `give_back` after the
        run (None: nothing to give back)."""
        return _lend(self.others)

    @staticmethod
    def give_back(own: int | None) -> None:
        """After a run on a borrowed thread: its own size back (its other parallel work keeps
        the size it had)."""
        if own is not None:
            set_thread_team_size(own)

    def __repr__(self) -> str:
        return f"ThreadTeams(alone={self.alone}, shared={self.shared}, others={self.others})"
