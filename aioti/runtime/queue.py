"""`RequestQueue`: the bounded queue between callers and the model's runs, and its gates.

It owns every decision that needs the one lock of a model's runtime:
- admission: `try_put` (`put_here` for on-loop runs) queues when there is room, and raises
  `ClosedError` once closing; `wait_for_room` parks a caller in a `ParkingLot` until there is;
- taking: a worker's `take` sleeps until there is work, lingers for a fuller batch under
  demand, and takes its share of the queue (`take_here` does the same for an on-loop run);
- cancellation: `cancel` removes a queued request (it never runs); `begin` leaves out those
  whose caller left after a worker took them, and marks the rest RUNNING;
- counting: batches running, requests completed / failed / cancelled (`finish`);
- the exclusive gate: `exclusive()` holds off new batches and waits for running ones;
- closing: `close` stops admission (failing queued requests on request); `exit_worker` tells
  the last worker to go what is left to fail.

Idle workers sleep on conditions of their own. A request goes to worker 0, the lead (on CPU
the one thread that forks a native thread team, `ThreadTeams`): it wakes the lead when it
sleeps, wakes nobody while the lead is on its way back from a batch (it takes the request
without a wake-up), and wakes the most recently idle other worker only while the lead runs a
batch. A worker that takes its share of a longer queue wakes another for the rest.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..errors import ClosedError
from ..loops import Loop
from ..loops.parking import ParkingLot
from .lifecycle import FORKED
from .options import RuntimeOptions
from .request import CANCELLED, QUEUED, RUNNING, Request

__all__ = ["CLOSED", "STOP", "RequestQueue"]

#: what `take` returns to a worker that should exit (closing, nothing queued or in flight)
STOP: Any = object()

#: a queue's `closed_reason` until something else closes it
CLOSED = "the model is closed"



class RequestQueue:
    def __init__(self, options: RuntimeOptions, room: ParkingLot | None = None) -> None:
        self.max_queue = options.max_queue
        self._max_rows = options.max_batch_size
        self._linger = options.max_delay_s
        self._workers = options.workers
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # hot paths enter self._lock directly
        self._items: deque[Request] = deque()
        self._rows = 0  # queued rows
        # Callers waiting for room (a pool's replicas share one lot: `is None`, since an
        # empty lot is falsy).
        self._room = room if room is not None else ParkingLot()
        self.closing = False
        self.closed_reason = CLOSED
        self._drop_queued = False
        self._paused = 0
        self.running = 0  # batches taken and not yet finished
        self.begun = 0  # batches taken so far (a lone run on a caller's thread included)
        self._running_rows = 0
        self._sleeping: list[threading.Condition] = []  # idle workers, the most recent last
        self._lead_free = False  # worker 0 is between its batches, on its way to `take`
        self._own = [threading.Condition(self._lock) for _ in range(options.workers)]
        self._lingering = 0  # workers waiting for a fuller batch: notified once it is full
        self._last_take = 0
        #: on-loop runs: the loop that has one scheduled (a loop schedules its own unless so),
        #: and what runs there (set by the runtime that has them)
        self._scheduled_on: Loop | None = None
        self.on_loop_run: Callable[[Loop], object] | None = None
        self._alive = options.workers
        self.completed = self.failed = self.cancelled = 0

    # --- callers (event loop threads) ----------------------------------------------------------

    def try_put(self, req: Request) -> bool:
        """Queue `req` if there is room, and wake an idle worker for it."""
        with self._lock:
            if self.closing:
                raise ClosedError(self.closed_reason)
            if len(self._items) >= self.max_queue:
                return False
            self._items.append(req)
            self._rows += req.rows
            if self._sleeping:
                self._wake_locked()
            if self._lingering and (self._rows >= self._max_rows or self.full):
                self._cond.notify()  # as full as the batch (or the queue) gets
        return True

    def _wake_locked(self) -> None:
        """Wake an idle worker for a new request: the lead if it sleeps; none while it is
        between batches; else the most recently idle."""
        sleeping, lead = self._sleeping, self._own[0]
        if sleeping[-1] is lead:
            sleeping.pop().notify()
        elif lead in sleeping:
            sleeping.remove(lead)
            lead.notify()
        elif not self._lead_free:
            sleeping.pop().notify()

    def put_here(self, req: Request) -> bool:
        """On-loop mode's `try_put`: queue `req` if there is room, and have `req.loop` run
        `on_loop_run` soon unless a run of its own is pending there. Workers are not woken:
        they are the fallback. A full queue also schedules a run: what fills it may belong to a
        loop that stalled or closed, and a run on this loop takes it."""
        with self._lock:
            if self.closing:
                raise ClosedError(self.closed_reason)
            schedule = self._scheduled_on is not req.loop
            self._scheduled_on = req.loop
            accepted = len(self._items) < self.max_queue
            if accepted:
                self._items.append(req)
                self._rows += req.rows
        if schedule:
            req.loop.soon(self.on_loop_run, req.loop)  # type: ignore[arg-type]
        return accepted

    async def wait_for_room(self) -> None:
        """Park until a request leaves the queue, or closing begins (returns at once if there
        is room already)."""
        with self._lock:
            if len(self._items) < self.max_queue or self.closing:
                return
            ticket = self._room.park()
        # Woken but leaving (cancelled): the room it was woken for goes to the next.
        await self._room.wait(ticket, on_lost_turn=self._room.unpark)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.max_queue

    @property
    def outstanding(self) -> int:
        """Rows queued plus rows running (read without the lock: for routing, not counting)."""
        return self._rows + self._running_rows

    def drain(self) -> list[Request]:
        """Empty the queue (without closing it) and return what it held."""
        with self._lock:
            items = self._take_all_locked()
        if items:
            self._room.unpark(len(items))
        return items

    def cancel(self, req: Request) -> None:
        """The caller of `req` stopped waiting: a queued request never runs; a running one is
        left to finish and its outputs are dropped."""
        with self._lock:
            if req.state == QUEUED:
                try:
                    self._items.remove(req)
                    self._rows -= req.rows
                except ValueError:
                    pass  # taken by a worker, not begun: `begin` will leave it out
                else:
                    self._room.unpark(1)
            if req.state in (QUEUED, RUNNING):
                req.state = CANCELLED
                self.cancelled += 1

    # --- workers --------------------------------------------------------------------------------

    def begin(self, reqs: Sequence[Request]) -> list[Request]:
        """Right before running `reqs` (taken, together): those that may run, now RUNNING;
        leaves out any whose caller left (its waiter is done: cancelled, its task not resumed
        yet), and all once closing with `cancel_queued` (they get `ClosedError`)."""
        live: list[Request] = []
        now = time.perf_counter()
        with self._lock:
            if self._drop_queued:
                for req in reqs:
                    if req.state == QUEUED:
                        req.error = ClosedError("the model was closed before this request ran")
                return live
            for req in reqs:
                if req.state == QUEUED:
                    if req.waiter.done():
                        req.state = CANCELLED
                        self.cancelled += 1
                        continue
                    req.state = RUNNING
                    req.began = now
                    live.append(req)
        return live

    def take(self, index: int, in_flight: bool) -> tuple[list[Request], int] | None:
        """For worker `index`: sleep until there is work, then take a batch: (batch, busy), with
        busy the batches running, this one included, plus one when more is queued for another
        worker. None when a worker with batches `in_flight` should land one first; `STOP` when
        it should exit (closing, nothing queued)."""
        items, cond = self._items, self._cond
        with cond:
            while True:
                if self._paused or not items:
                    if in_flight:
                        return None  # land a batch rather than wait for work
                    if not items and self.closing:
                        return STOP  # type: ignore[no-any-return]
                    if not self._paused and self._under_demand():
                        # A batch is coming: sleep until it is full (or the delay passes)
                        # rather than waking at its first request.
                        self._lingering += 1
                        cond.wait(self._linger)
                        self._lingering -= 1
                        if not items:
                            self._last_take = 0  # demand is gone
                        continue
                    mine = self._own[index]
                    self._sleeping.append(mine)
                    mine.wait()
                    if mine in self._sleeping:  # woken by `_wake_all_locked`
                        self._sleeping.remove(mine)
                    continue
                if self._should_linger():
                    if in_flight:
                        return None  # land a batch while this one fills
                    self._lingering += 1
                    cond.wait(self._linger - (time.perf_counter() - items[0].t0))
                    self._lingering -= 1
                    continue
                batch = self._take_locked(self._workers)
                self.running += 1
                self.begun += 1
                if index == 0:
                    self._lead_free = False
                if items and self._sleeping:  # the rest is another worker's share
                    self._sleeping.pop().notify()
                # One more busy where another worker is to take what is left (a lone worker
                # takes it next, after this batch: its team stays the one it runs alone).
                more = 1 if items and self._workers > 1 else 0
                return batch, self.running + more

    def returning(self, index: int) -> None:
        """Worker `index` has run its batch and comes back to `take` (before it delivers the
        batch, whose callers' next requests may follow at once)."""
        if index == 0:
            self._lead_free = True  # read under the lock by `try_put`; `take` clears it

    def claim_idle(self, req: Request) -> bool:
        """For a lone request run on its caller's thread: True, counting it as a running batch,
        when nothing is queued or running, no pause is on and the model is open (it then
        starts no later than it would have on a worker: ordering holds)."""
        if self._items or self.running:  # the busy case decides without the lock
            return False
        with self._lock:
            if self._items or self.running or self._paused or self.closing or not self._alive:
                return False
            self.running += 1
            self.begun += 1
            self._running_rows += req.rows
            return True

    def wait_idle(self) -> None:
        """Block until no batch runs (a lone run on a caller's thread included)."""
        with self._cond:
            while self.running:
                self._cond.wait(0.05)

    def take_here(self, loop: Loop) -> tuple[list[Request], int, bool] | None:
        """For an on-loop run on `loop`'s thread: (batch, busy, more) with `more` True when
        the loop must schedule another run for what is left; None when nothing may run now
        (a pause is on: the workers take the queue when it ends; or the workers are gone)."""
        with self._lock:
            if self._scheduled_on is loop:
                self._scheduled_on = None
            if self._paused or not self._alive or not self._items:
                return None
            batch = self._take_locked(1)
            self.running += 1
            self.begun += 1
            more = bool(self._items) and self._scheduled_on is None
            if more:
                self._scheduled_on = loop
            return batch, self.running, more

    def finish(self, rows: int, completed: int, failed: int) -> None:
        """A taken batch of `rows` is over: `completed` requests got outputs, `failed` an
        error."""
        with self._lock:  # `_cond`'s lock: held, it may notify
            self.running -= 1
            self._running_rows -= rows
            self.completed += completed
            self.failed += failed
            if (self._paused or self.closing) and not self.running:
                self._cond.notify_all()

    def exit_worker(self) -> list[Request] | None:
        """A worker is leaving. For the last one: closing is set, and the requests left queued
        are returned (to fail) once no batch runs anywhere (on-loop runs included); for the
        others None."""
        with self._cond:
            self._alive -= 1
            if self._alive:
                return None
            self.closing = True
            leftover = self._take_all_locked()
            while self.running:
                self._cond.wait()
            return leftover

    def _under_demand(self) -> bool:
        """Batching, and the last take merged several requests: more are likely coming."""
        return bool(self._linger) and self._last_take > 1

    def _should_linger(self) -> bool:
        """Wait for a fuller batch? Only under demand, short of a full batch with room in the
        queue for more (a full queue takes no request until this one takes some), and until
        the oldest request has waited the delay."""
        return (
            self._under_demand() and self._rows < self._max_rows and not self.full
            and not self.closing
            and time.perf_counter() - self._items[0].t0 < self._linger
        )

    def _take_locked(self, workers: int) -> list[Request]:
        """A batch off the queue: one taker's share of it among `workers`, up to a full batch."""
        q, cap = self._items, self._max_rows
        n = min(cap, max(1, -(-len(q) // workers)), len(q))
        if n == len(q) and self._rows <= cap:  # the whole queue fits: take it
            batch = list(q)
            q.clear()
            rows = self._rows
        else:
            batch = []
            rows = 0
            while len(batch) < n and rows < cap:
                req = q.popleft()
                batch.append(req)
                rows += req.rows
        self._rows -= rows
        self._running_rows += rows
        self._last_take = len(batch)
        if len(self._room):
            self._room.unpark(len(batch))
        return batch

    def _wake_all_locked(self) -> None:
        self._cond.notify_all()
        for own in self._sleeping:
            own.notify()
        self._sleeping.clear()

    # --- the gate and closing -------------------------------------------------------------------

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold off new batches and wait for running ones; for native calls that must not race
        with runs. Blocks the calling thread: call it from a worker thread, never a loop."""
        with self._cond:
            self._paused += 1
            while self.running:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._paused -= 1
                self._wake_all_locked()

    def close(self, *, cancel_queued: bool = False) -> list[Request]:
        """Stop admission and wake everyone; with `cancel_queued`, empty the queue and return
        what it held (marked CANCELLED, to fail), and refuse what workers took but not begun."""
        with self._cond:
            self.closing = True
            dropped = self._take_all_locked() if cancel_queued else []
            if cancel_queued:
                self._drop_queued = True
            for req in dropped:
                req.state = CANCELLED
            self._wake_all_locked()
        self._room.unpark_all()  # they retry, and meet ClosedError
        return dropped

    def fail(self, reason: str) -> list[Request]:
        """A worker failed (`Workers`): stop admission, saying `reason` unless closing began
        already, wake everyone (the other workers finish their batches and exit), and return
        the queued requests, to fail: no worker is left to trust with them."""
        with self._cond:
            if not self.closing:
                self.closing = True
                self.closed_reason = reason
            items = self._take_all_locked()
            self._wake_all_locked()
        self._room.unpark_all()  # they retry, and meet ClosedError
        return items

    def _take_all_locked(self) -> list[Request]:
        """Empty the queue (its lock held) and return what it held."""
        items = list(self._items)
        self._items.clear()
        self._rows = 0
        return items

    def orphaned(self) -> None:
        """In a forked child: closed, with no workers. The lock is made anew, since a thread of
        the parent may have held it at the fork."""
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._own = [threading.Condition(self._lock) for _ in self._own]
        self._sleeping, self._lingering, self.running, self._paused = [], 0, 0, 0
        self._scheduled_on = None
        self._items.clear()
        self._room = ParkingLot()
        self._rows = 0
        self.closing = True
        self.closed_reason = FORKED
        self._alive = 0

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"queued": len(self._items), "running": self.running,
                    "completed": self.completed, "failed": self.failed,
                    "cancelled": self.cancelled}
