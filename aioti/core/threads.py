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
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["SizeTuner", "ThreadTeams", "set_thread_team_size", "team_of_one",
           "thread_team_size"]


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


#: `SizeTuner`'s schedule: the batches each size runs at first, the batches a probe runs (its
#: first untimed), the batches from one probe to the next after a probe that changed the
#: choice (doubling after each that did not, up to the last)
FIRST_RUN, PROBE_RUN, PROBE_FIRST, PROBE_MAX = 8, 4, 32, 512
#: the latest batches of a size whose mean time is its measure
_WINDOW = 8


class SizeTuner:
    """The choice between two team sizes of the lead's batches alone, by measure.

    A team waits at every barrier for its slowest thread; where other processes keep cores
    busy, a thread of the team waits for a core, so that a smaller team can run faster
    (benchmarks/README.md, the contention rows). Each size's measure is its mean time per
    request over its latest `_WINDOW` batches: the mean, as a team that waits for a core now
    and then is slow on average though most of its batches are fast. The sizes run
    `FIRST_RUN` batches each at first; then the faster runs, and the other is probed now and
    then for `PROBE_RUN` batches (its measure from those alone), so that a change of load is
    seen: the next probe comes `PROBE_FIRST` batches after one that changed the choice, and
    twice as long after one that did not (at most `PROBE_MAX`). A rise of the running size's
    own measure above the other's switches at once, and the size left behind is probed again
    within `PROBE_FIRST` batches (a few slow batches may have been a pause, not a change).
    `record` is not called for the first batch after a change of size (its team's threads
    wake, or libgomp makes them, which would make every probe of a larger team look slow), nor
    for one that another batch of the model ran beside. Used by the lead's thread only.
    """

    def __init__(self, sizes: tuple[int, int]) -> None:
        self.sizes = sizes
        #: each size's measure, seconds per request (0.0: not measured)
        self.costs = [0.0, 0.0]
        self._samples: list[deque[float]] = [deque(maxlen=_WINDOW), deque(maxlen=_WINDOW)]
        self._batches = 0
        self._interval = PROBE_FIRST
        self._probe_at = 2 * FIRST_RUN + PROBE_FIRST
        self._probing: tuple[int, int] | None = None  # (size index, batches left)
        self._running = 0  # the index of the size that ran last outside a probe

    @property
    def best(self) -> int:
        """The index of the size measured faster (an unmeasured one first)."""
        return 0 if self.costs[0] <= self.costs[1] else 1

    def pick(self) -> int:
        """The index of the size for the next batch alone."""
        k = self._batches
        self._batches += 1
        if k < 2 * FIRST_RUN:
            return k // FIRST_RUN
        if self._probing is not None:
            index, left = self._probing
            if left:
                self._probing = (index, left - 1)
                return index
            self._probing = None
            won = self.best == index
            self._interval = PROBE_FIRST if won else min(2 * self._interval, PROBE_MAX)
            self._probe_at = k + self._interval
        elif k >= self._probe_at:
            index = 1 - self.best
            self._samples[index].clear()  # its measure from this probe's batches alone
            self._probing = (index, PROBE_RUN - 1)
            return index
        best = self.best
        if best != self._running:  # a switch: the size left behind is probed again soon
            self._running = best
            self._interval = PROBE_FIRST
            self._probe_at = min(self._probe_at, k + PROBE_FIRST)
        return best

    def record(self, index: int, seconds: float, requests: int) -> None:
        """A batch of `requests` at `sizes[index]` took `seconds`."""
        samples = self._samples[index]
        samples.append(seconds / max(1, requests))
        self.costs[index] = sum(samples) / len(samples)


class ThreadTeams:
    """A model's team sizes, by thread: its lead worker uses `alone` threads for a batch that
    runs while no other batch of the model does (a lone request gets every core), `shared`
    while others run too (busy workers do not oversubscribe the cores); every other thread
    that runs the model uses `others`. Set before each batch, in the running thread, and only
    when it changes. With `tune` (and `alone` > 1), the lead's size alone is `alone` or half
    of it, whichever its `SizeTuner` measures faster."""

    def __init__(self, alone: int, shared: int, others: int | None = None, *,
                 tune: bool = False) -> None:
        others = shared if others is None else others
        if min(alone, shared, others) < 1:
            raise ValueError(f"threads must be >= 1, got {alone}, {shared} and {others}")
        self.alone = alone
        self.shared = shared
        self.others = others
        self._current = threading.local()
        self.tuner = SizeTuner((alone, alone // 2)) if tune and alone > 1 else None

    @property
    def choices(self) -> tuple[int, ...]:
        """The sizes the lead may use for a batch alone."""
        return (self.alone,) if self.tuner is None else self.tuner.sizes

    @property
    def alone_now(self) -> int:
        """The size the lead uses for a batch alone, as measured so far."""
        return self.alone if self.tuner is None else self.tuner.sizes[self.tuner.best]

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

    def before_batch(self, busy: int) -> int | None:
        """In a worker, before a batch; `busy` counts the model's batches running, this one
        included (plus one when requests wait for another worker). Returns the tuner's index
        of the size it set, for `after_batch` (None: nothing to time)."""
        current = self._current
        lead = getattr(current, "lead", True)
        timed = None
        tuner = self.tuner
        if tuner is not None and lead and busy <= 1:
            timed = tuner.pick()
            n = tuner.sizes[timed]
        else:
            n = self.size(busy, lead)
        if getattr(current, "size", None) != n:
            set_thread_team_size(n)
            current.size = n
            return None  # its team wakes: not a measure of its size
        return timed

    def after_batch(self, timed: int, seconds: float, requests: int) -> None:
        """The lead's batch alone at the tuner's size `timed` took `seconds` for `requests`
        (the caller leaves out a batch that another batch of the model ran beside)."""
        assert self.tuner is not None
        self.tuner.record(timed, seconds, requests)

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
        tuned = f", tuned between {self.choices}" if len(self.choices) > 1 else ""
        return (f"ThreadTeams(alone={self.alone}, shared={self.shared}, others={self.others}"
                f"{tuned})")
