"""The request queue and its worker threads: the bridge between event loops and native runs.

Protocol, in one place:

- A caller (on any event loop) makes a `Request` holding its inputs and a waiter of its own loop
  and puts it on the bounded queue (`submit`): at once when there is room, else it waits for
  room (or gets `QueueFullError`, by option), or `ClosedError` once closing has begun.
- Each worker thread owns one execution context (a CUDA stream, or nothing on CPU). A worker
  that wakes takes every queued request up to its share in one go, runs them through the
  `process` function it was given, and hands all results that go to one loop back in one
  `post` (one loop wake-up per loop per batch). Settling skips waiters already cancelled.
- Cancellation of a caller removes its request from the queue if it is still there (it never
  runs); a request already running finishes and its outputs are dropped on delivery.
- `exclusive()` stops workers from starting new batches and waits for running ones: constant
  mutations that the native container does not synchronize run inside it.
- Closing stops admission, optionally fails queued requests with `ClosedError`, lets the
  workers finish the rest, and calls `on_stopped` (deleting the native container) from the last
  worker to exit, after every run has returned.
- With `inline` (on-loop batching), submitting does not wake a worker: the first request a loop
  queues schedules, on that loop, a run of the queued requests right there once the loop's ready
  tasks have run (`Loop.soon`); results for that loop are settled in place, others posted. The
  workers stay as the fallback: they take what is queued when a pause or closing wakes them.
- In a forked child every dispatcher is closed at once (its worker threads did not come along):
  submissions raise `ClosedError` saying so, and closing returns without native calls.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from ..errors import ClosedError, QueueFullError
from .loops import Loop, Waiter, wake

__all__ = ["Dispatcher", "Request"]

QUEUED, RUNNING, DONE, CANCELLED = range(4)

Begin = Callable[[Sequence["Request"]], list["Request"]]


class Request:
    """One unit of work: inputs in, `result` or `error` out, delivered to `waiter` on `loop`."""

    __slots__ = ("payload", "loop", "waiter", "state", "result", "error", "t0", "extra", "size")

    def __init__(self, payload: Any, loop: Loop) -> None:
        self.payload = payload
        self.loop = loop
        self.waiter: Waiter = loop.waiter()
        self.state = QUEUED
        self.result: Any = None
        self.error: BaseException | None = None
        self.t0 = time.perf_counter()
        self.extra: Any = None  # the batcher's grouping key
        self.size = 1  # what the request counts toward a full batch (its rows, when batching)


class _Latencies:
    """A bounded sample of recent request latencies (seconds)."""

    def __init__(self, size: int = 8192) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self._samples.append(value)

    def extend(self, values: list[float]) -> None:
        self._samples.extend(values)

    def percentiles(self, *qs: float) -> dict[str, float | None]:
        data = sorted(self._samples)
        if not data:
            return {f"p{int(q)}": None for q in qs}
        return {f"p{int(q)}": data[min(len(data) - 1, int(q / 100 * len(data)))] for q in qs}


_live: weakref.WeakSet[Dispatcher] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    """Stop every dispatcher's workers before interpreter shutdown joins threads."""
    for d in list(_live):
        d.shutdown(wait=5.0)


#: two on-loop batches in a row that each kept their loop this long (s) warn, once per model
#: (one alone may be a garbage-collection pause that landed in it: seen, 70 ms on the small MLP)
ON_LOOP_WARN_S = 0.01

FORKED = ("the model was loaded before this process was forked, and its worker threads did not "
          "survive the fork: load it again in this process")


def _after_fork_in_child() -> None:
    """Worker threads do not survive a fork: in the child, every model loaded before it refuses
    requests at once instead of queueing them for no one (a hang)."""
    for d in list(_live):
        d._orphaned()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Dispatcher:
    """A bounded queue served by `len(contexts)` worker threads."""

    def __init__(
        self,
        process: Callable[[Any, list[Request], Begin], Any],
        *,
        workers: int,
        max_queue: int,
        start_worker: Callable[[int], Any] = lambda i: None,
        stop_worker: Callable[[Any], None] = lambda ctx: None,
        on_stopped: Callable[[], None] = lambda: None,
        before_batch: Callable[[int], None] | None = None,
        ready: Callable[[Any], bool] = lambda token: True,
        wait_ready: Callable[[Any], None] = lambda token: None,
        max_in_flight: int = 0,
        max_take: int = 64,
        fill: int | None = None,
        linger: float = 0.0,
        inline: bool = False,
        inline_team: Callable[[int], AbstractContextManager[None]] | None = None,
        name: str = "aioti",
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._process = process
        self._start_worker = start_worker
        self._stop_worker = stop_worker
        self._on_stopped = on_stopped
        # In the worker before each batch, with the number of batches running (this one
        # included), plus one if requests are left queued for another worker.
        self._before_batch = before_batch
        # `process` returns None when a batch's outputs are ready, else a token that `ready`
        # polls and `wait_ready` blocks on: a worker goes on launching batches meanwhile, with
        # up to `max_in_flight` of them unfinished, and delivers each once it is ready.
        self._ready = ready
        self._wait_ready = wait_ready
        self._max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.max_take = max_take
        self.fill = fill or max_take  # queued size at which a batch is full
        self._queued_size = 0
        self._linger = linger
        # On-loop runs: the loop that last scheduled one (a loop schedules its own unless it is
        # this one); the native team settings for a run on a loop's thread.
        self._inline = inline
        self._inline_on: Loop | None = None
        self._inline_team = inline_team or (lambda busy: nullcontext())
        self._warned_slow = False
        self._slow_before: float | None = None  # the last on-loop batch's time, if slow
        self._last_take = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # hot paths enter self._lock directly
        self._queue: deque[Request] = deque()
        self._space: deque[tuple[Loop, Waiter]] = deque()
        self._closing = False
        self.closed_reason = "the model is closed"
        self._drop_queued = False
        self._paused = 0
        self._running = 0
        # Idle workers' own conditions, the most recently idle last: a request wakes that one,
        # whose native thread team (and caches) are still warm; alternating between workers
        # made one request at a time slower (mid MLP, two workers: ~720 -> ~840 runs/s).
        self._sleeping: list[threading.Condition] = []
        self._own = [threading.Condition(self._lock) for _ in range(workers)]
        self._lingering = 0  # workers waiting for a fuller batch: notified only once it is full
        self._alive = workers
        self.completed = self.failed = self.cancelled = 0
        self.latency = _Latencies()
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._worker, args=(i,), name=f"{name}-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        self._num_workers = workers
        _live.add(self)
        for t in self._threads:
            t.start()

    # --- callers' side (event loop threads) ---------------------------------------------------

    @property
    def closing(self) -> bool:
        return self._closing

    def try_submit(self, req: Request) -> bool:
        """Queue `req` if there is room; raises `ClosedError` once closing has begun."""
        with self._lock:
            if self._closing:
                raise ClosedError(self.closed_reason)
            if len(self._queue) >= self.max_queue:
                return False
            self._queue.append(req)
            self._queued_size += req.size
            schedule = False
            if self._inline:
                schedule = self._inline_on is not req.loop
                self._inline_on = req.loop
            elif self._sleeping:
                self._sleeping.pop().notify()
            elif self._lingering and self._queued_size >= self.fill:
                self._cond.notify()
        if schedule:
            req.loop.soon(self._run_here, req.loop)
        return True

    async def submit(self, req: Request, *, wait: bool = True) -> None:
        """Queue `req`, waiting for room when the queue is full (or raising `QueueFullError`)."""
        while not self.try_submit(req):
            if not wait:
                raise QueueFullError(
                    f"the request queue is full ({self.max_queue} waiting); try again later"
                )
            entry = (req.loop, req.loop.waiter())
            with self._cond:
                if len(self._queue) < self.max_queue or self._closing:
                    continue
                self._space.append(entry)
            try:
                await entry[1]
            except BaseException:
                with self._cond:
                    if entry in self._space:
                        self._space.remove(entry)
                    elif self._space:  # we were woken but leave: pass the turn on
                        self._wake_space_locked(1)
                raise

    def begin(self, reqs: Sequence[Request]) -> list[Request]:
        """Worker side, right before running `reqs` (together): those that may run, leaving
        out any whose caller left, or whose waiter was cancelled (or all, when the model is
        closing with `cancel_queued`).
        Requests a worker has taken but not begun count as queued for cancellation."""
        live: list[Request] = []
        with self._lock:
            if self._drop_queued:
                for req in reqs:
                    if req.state == QUEUED:
                        req.error = ClosedError("the model was closed before this request ran")
                return live
            for req in reqs:
                if req.state == QUEUED:
                    if req.waiter.done():  # cancelled; its task has not resumed to say so yet
                        req.state = CANCELLED
                        self.cancelled += 1
                        continue
                    req.state = RUNNING
                    live.append(req)
        return live

    def cancel(self, req: Request) -> None:
        """The caller of `req` stopped waiting: a queued request never runs; a running one is
        left to finish and its outputs are dropped."""
        with self._lock:
            if req.state == QUEUED:
                try:
                    self._queue.remove(req)
                    self._queued_size -= req.size
                except ValueError:
                    pass  # taken by a worker, not begun: begin() will refuse it
                else:
                    self._wake_space_locked(1)
            if req.state in (QUEUED, RUNNING):
                req.state = CANCELLED
                self.cancelled += 1

    def stats(self) -> dict[str, Any]:
        with self._cond:
            counts = {
                "queued": len(self._queue), "running": self._running,
                "completed": self.completed, "failed": self.failed, "cancelled": self.cancelled,
                "workers": self._num_workers, "max_queue": self.max_queue,
            }
        return {**counts, "latency_s": self.latency.percentiles(50, 90, 99)}

    def _orphaned(self) -> None:
        """In a forked child: closed, with no workers and nothing to wait for. The locks are
        made anew, since a thread of the parent may have held them at the fork; the native
        container is left alone (its worker state did not come along)."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._own = [threading.Condition(self._lock) for _ in self._own]
        self._sleeping, self._lingering, self._running, self._paused = [], 0, 0, 0
        self._inline_on = None
        self._queue.clear()
        self._space.clear()
        self._queued_size = 0
        self._closing = True
        self.closed_reason = FORKED
        self._alive = 0
        self._stopped = threading.Event()
        self._stopped.set()
        _live.discard(self)

    # --- exclusive sections (mutation threads) ------------------------------------------------

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off new batches and wait for running ones; for native calls that must not race
        with runs. Blocks the calling thread: call it from a worker thread, never a loop."""
        with self._cond:
            self._paused += 1
            while self._running:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._wake_all_locked()

    # --- closing ------------------------------------------------------------------------------

    def shutdown(self, *, cancel_queued: bool = False, wait: float | None = None) -> None:
        """Stop admission and let the workers finish; `wait` seconds to join them (None: don't)."""
        with self._cond:
            self._closing = True
            dropped = list(self._queue) if cancel_queued else []
            if cancel_queued:
                self._queue.clear()
                self._queued_size = 0
                self._drop_queued = True
            for req in dropped:
                req.state = CANCELLED
            space = list(self._space)
            self._space.clear()
            self._wake_all_locked()
        self._fail(dropped, ClosedError("the model was closed before this request ran"))
        for loop, waiter in space:
            wake(loop, waiter)
        if wait is not None:
            deadline = time.monotonic() + wait
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join(max(0.0, deadline - time.monotonic()))

    def join(self) -> None:
        """Block until every worker has exited and `on_stopped` has run."""
        for t in self._threads:
            t.join()
        self._stopped.wait()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    # --- workers ------------------------------------------------------------------------------

    def _wake_all_locked(self) -> None:
        self._cond.notify_all()
        for own in self._sleeping:
            own.notify()
        self._sleeping.clear()

    def _wake_space_locked(self, n: int) -> list[tuple[Loop, Waiter]]:
        woken = [self._space.popleft() for _ in range(min(n, len(self._space)))]
        for loop, waiter in woken:
            wake(loop, waiter)
        return woken

    def _under_demand(self) -> bool:
        """Batching, and the last take merged several requests: more are likely coming."""
        return bool(self._linger) and self._last_take > 1

    def _should_linger(self) -> bool:
        """Wait for a fuller batch? Only under demand, short of a full batch, and until the
        oldest request has waited `linger` seconds."""
        return (
            self._under_demand() and self._queued_size < self.fill and not self._closing
            and time.perf_counter() - self._queue[0].t0 < self._linger
        )

    def _take_locked(self, workers: int | None = None) -> list[Request]:
        """A batch off the queue: this taker's share of it among `workers` (default: all)."""
        q = self._queue
        n = min(self.max_take, max(1, -(-len(q) // (workers or self._num_workers))), len(q))
        if n == len(q) and self._queued_size <= self.fill:  # the whole queue fits: take it
            batch = list(q)
            q.clear()
            size = self._queued_size
        else:
            batch = []
            size = 0
            while len(batch) < n and size < self.fill:
                req = q.popleft()
                batch.append(req)
                size += req.size
        self._queued_size -= size
        self._last_take = len(batch)
        if self._space:
            self._wake_space_locked(len(batch))
        return batch

    def _fail(self, reqs: list[Request], error: BaseException) -> None:
        for req in reqs:
            req.error, req.payload = error, None
        self._deliver(reqs)

    def _deliver(self, reqs: list[Request], here: Loop | None = None) -> None:
        """Hand finished requests (`result` or `error` set) to their loops, one post per loop;
        those of `here`, the loop whose thread this is, are settled at once."""
        if not reqs:
            return
        loop = reqs[0].loop
        if all(r.loop is loop for r in reqs):
            groups: Any = (reqs,)
        else:
            by_loop: dict[int, list[Request]] = {}
            for req in reqs:
                by_loop.setdefault(id(req.loop), []).append(req)
            groups = by_loop.values()
        for group in groups:
            if group[0].loop is here:
                self._settle_batch(group)
            else:
                group[0].loop.post(self._settle_batch, group)  # a closed loop: outputs dropped

    def _settle_batch(self, reqs: list[Request]) -> None:
        reqs[0].loop.settle_all(reqs)  # one loop per call (see _deliver)
        now = time.perf_counter()
        self.latency.extend([now - req.t0 for req in reqs])

    def _complete(self, batch: list[Request], here: Loop | None = None) -> None:
        """A batch's outputs are ready (or it failed): count it as done, then deliver it (a
        caller that reads `stats()` once resumed finds its request counted)."""
        done = []
        bad = 0
        for req in batch:
            req.payload = None
            if req.state == CANCELLED:
                req.result = None  # outputs released here
                continue
            req.state = DONE
            done.append(req)
            if req.error is not None:
                bad += 1
        with self._cond:
            self._running -= 1
            self.completed += len(done) - bad
            self.failed += bad
            if (self._paused or self._closing) and not self._running:
                self._cond.notify_all()
        self._deliver(done, here)

    def _land(self, token: Any, batch: list[Request], here: Loop | None = None) -> None:
        """Block (GIL-free in the backend) until an in-flight batch is ready, then complete it."""
        try:
            self._wait_ready(token)
        except Exception as exc:
            for req in batch:
                req.error, req.result = exc, None
        self._complete(batch, here)

    def _run(self, ctx: Any, batch: list[Request], busy: int, *, here: bool = False) -> Any:
        """`process` a taken batch with the native team set for `busy` running batches (a
        worker's, or borrowed on a loop's thread when `here`); its token (None: outputs ready).
        Errors are set per request by `process`; anything escaping, the team's setting
        included, is a bug, set on the requests it left unset."""
        try:
            if here:
                with self._inline_team(busy):
                    return self._process(ctx, batch, self.begin)
            if self._before_batch is not None:
                self._before_batch(busy)
            return self._process(ctx, batch, self.begin)
        except BaseException as exc:
            for req in batch:
                if req.error is None and req.result is None:
                    req.error = exc
            if not isinstance(exc, Exception):
                self._complete(batch)
                raise
        return None

    def _run_here(self, loop: Loop) -> None:
        """On `loop`'s thread (inline mode), after its ready tasks: run a batch of the queued
        requests, whichever loop they came from, right here. Nothing runs while a pause is on
        (the workers take the queue when it ends) or once the workers are gone."""
        with self._lock:
            if self._inline_on is loop:
                self._inline_on = None
            if self._paused or not self._alive or not self._queue:
                return
            batch = self._take_locked(workers=1)
            self._running += 1
            busy = self._running
            more = bool(self._queue) and self._inline_on is None
            if more:
                self._inline_on = loop
        if more:  # more than a batch was queued: go on after this loop's ready tasks
            loop.soon(self._run_here, loop)
        t0 = time.perf_counter()
        token = self._run(None, batch, busy, here=True)
        if token is not None:
            self._land(token, batch, loop)
        else:
            self._complete(batch, loop)
        took = time.perf_counter() - t0
        if took < ON_LOOP_WARN_S:
            self._slow_before = None
            return
        if self._slow_before is not None and not self._warned_slow:
            self._warned_slow = True
            warnings.warn(
                f"on-loop batches (this one of {len(batch)} requests) kept the event loop busy "
                f"for {min(took, self._slow_before) * 1e3:.1f} ms or more each, twice in a row; "
                "on_loop=True suits models whose batched run takes microseconds "
                "(Batching(on_loop=False) runs batches in a worker thread)",
                RuntimeWarning, stacklevel=1)
        self._slow_before = took

    def _worker(self, index: int) -> None:
        cond, queue = self._cond, self._queue
        ready, max_flight = self._ready, self._max_in_flight
        flight: deque[tuple[Any, list[Request]]] = deque()  # launched, not yet ready
        ctx = None
        try:
            ctx = self._start_worker(index)
            while True:
                while flight:
                    try:
                        if not ready(flight[0][0]):
                            break
                    except Exception:  # `_land` meets it again and hands it to the callers
                        self._land(*flight.popleft())
                        continue
                    self._complete(flight.popleft()[1])
                with cond:
                    take = False
                    while True:
                        if self._paused or not queue:
                            if flight:
                                break  # wait for an in-flight batch rather than for work
                            if not queue and self._closing:
                                return
                            if not self._paused and self._under_demand():
                                # Under demand, a batch is coming: sleep until it is full (or
                                # `linger` passes) rather than waking at its first request.
                                self._lingering += 1
                                cond.wait(self._linger)
                                self._lingering -= 1
                                if not queue:
                                    self._last_take = 0  # demand is gone
                                continue
                            mine = self._own[index]
                            self._sleeping.append(mine)
                            mine.wait()
                            if mine in self._sleeping:  # woken by `_wake_all_locked`
                                self._sleeping.remove(mine)
                            continue
                        if self._should_linger():
                            if flight:
                                break  # land an in-flight batch while this one fills
                            self._lingering += 1
                            cond.wait(self._linger - (time.perf_counter() - queue[0].t0))
                            self._lingering -= 1
                            continue
                        take = True
                        break
                    if take:
                        batch = self._take_locked()
                        self._running += 1
                        busy = self._running + (1 if queue else 0)  # others run, or will soon
                if not take:
                    self._land(*flight.popleft())
                    continue
                token = self._run(ctx, batch, busy)
                if token is None:
                    self._complete(batch)
                else:
                    flight.append((token, batch))
                    if len(flight) > max_flight:
                        self._land(*flight.popleft())
                del batch
        finally:
            while flight:
                self._land(*flight.popleft())
            if ctx is not None:
                self._stop_worker(ctx)
            with cond:
                self._alive -= 1
                last = self._alive == 0
                if last:
                    self._closing = True
                    leftover = list(queue)
                    queue.clear()
                    self._queued_size = 0
                    while self._running:  # runs on a loop's thread (inline mode)
                        cond.wait()
            if last:
                self._fail(leftover,
                           ClosedError("the model's workers stopped before this request ran"))
                try:
                    self._on_stopped()
                finally:
                    self._stopped.set()
                    _live.discard(self)
