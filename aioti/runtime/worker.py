"""The worker protocol: one batch's life (`BatchRunner`), and the threads that live it
(`Workers`).

A batch, top to bottom:
1. taken off the queue (`RequestQueue.take`), with the number of batches running;
2. the native thread team is sized for that number (`ThreadTeams`);
3. the backend readies the worker's stream for the batch's inputs (`Backend.begin_batch`);
4. chunk by chunk, the queue leaves out requests whose caller left (`RequestQueue.begin`) and
   the executor runs the live ones, setting their outcomes (`Executor.run`);
5. the backend says whether the outputs are ready (`Backend.finish`: None) or hands a token;
6. a ready batch is completed at once; one with a token stays in flight while the worker takes
   the next (up to `Backend.max_in_flight`), and is landed, in launch order, once ready;
7. completing counts it and delivers every outcome to its loop (`Delivery.complete`).

Neither part knows an event loop: delivery is a callback's business, and a worker needs no model
(the executor is given), so both are tested with fakes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..backends.base import Backend
from ..core.threads import ThreadTeams
from ..errors import ClosedError
from ..loops import Loop
from .delivery import Delivery
from .executor import Executor
from .options import RuntimeOptions
from .queue import STOP, RequestQueue
from .request import QUEUED, RUNNING, NotStarted, Request

__all__ = ["BatchRunner", "Workers"]

log = logging.getLogger("aioti")


class BatchRunner:
    """Runs taken batches through the executor on a backend, and lands them."""

    def __init__(self, queue: RequestQueue, delivery: Delivery, executor: Executor,
                 backend: Backend, teams: ThreadTeams | None = None,
                 on_fault: Callable[[BaseException], None] | None = None,
                 timed: bool = False, caller_stream: bool = False) -> None:
        self._queue = queue
        self.delivery = delivery
        self._executor = executor
        self._backend = backend
        self._teams = teams
        # A replica of a pool: a batch that fails as a whole hands its requests that had not
        # begun back (`NotStarted`, to run elsewhere), and reports the fault.
        self._on_fault = on_fault
        #: with `timed`: recent time (s) from a lone request's start until its outputs are
        #: ready (on a GPU too), per unit of its leading size (`Request.leading_size`), a moving
        #: average over batches of one request (inf until measured; kept only where a policy
        #: reads it)
        self.per_row_s = math.inf
        self._timed = timed
        #: a lone run launches on its caller's stream where the backend allows (`run_alone`)
        self._caller_stream = caller_stream
        #: the lead worker's context, once it has started (`run_alone` runs with it)
        self.lead: tuple[Any] | None = None
        #: the requests of the last batch a worker (or an on-loop run) completed: more than
        #: one says the model is serving concurrent callers
        self.last_batch = 0
        # The base backend's begin_batch waits on nothing: skip collecting readiness tokens.
        self._readies = type(backend).begin_batch is not Backend.begin_batch

    def enter(self, index: int) -> None:
        """In worker `index`'s thread, before its first batch: worker 0 leads the model's
        native thread team (`ThreadTeams`)."""
        if self._teams is not None:
            self._teams.enter(lead=index == 0)

    def run(self, ctx: Any, batch: list[Request], busy: int, here: Loop | None = None) -> Any:
        """Steps 2-5 for a taken batch, in a worker (`ctx` its context) or on the thread of
        loop `here` (the team borrowed); returns the backend's token (None: outputs ready).
        An error escaping the steps (the team's setting included) is a batch's failure: it is
        set on each request left without an outcome."""
        try:
            if self._teams is None:
                return self._execute(ctx, batch)
            if here is not None:
                own = self._teams.borrow()
                try:
                    return self._execute(ctx, batch)
                finally:
                    self._teams.give_back(own)
            timed = self._teams.before_batch(busy)
            if timed is None:
                return self._execute(ctx, batch)
            queue, t0 = self._queue, time.perf_counter()
            begun = queue.begun
            token = self._execute(ctx, batch)
            if queue.begun == begun and queue.running <= 1:  # no other batch began beside it
                self._teams.after_batch(timed, time.perf_counter() - t0, len(batch))
            return token
        except BaseException as exc:
            unstarted = self.unstarted(exc)
            for req in batch:
                if req.error is None and req.result is None:
                    req.error = unstarted if req.state == QUEUED else exc
            if not isinstance(exc, Exception):
                self.delivery.complete(batch, here)
                raise
            self.fault(exc)
        return None

    def _execute(self, ctx: Any, batch: list[Request]) -> Any:
        backend, executor, begin = self._backend, self._executor, self._queue.begin
        stream = backend.begin_batch(ctx, [r.ready for r in batch] if self._readies else [])
        chunk = executor.chunk
        for i in range(0, len(batch), chunk):
            live = begin(batch[i:i + chunk] if len(batch) > chunk else batch)
            if live:
                executor.run(live, stream)
        return backend.finish(ctx)

    def unstarted(self, exc: BaseException) -> BaseException:
        """The outcome of a request that had not started when its batch failed as a whole:
        `NotStarted` for a replica of a pool (it may run on another), else the error."""
        return NotStarted(exc) if self._on_fault is not None else exc

    def _time(self, took: float) -> None:
        """A batch's time per unit of leading size, from its start until its outputs were
        ready, joins the average."""
        last = self.per_row_s
        self.per_row_s = took if last == math.inf else 0.8 * last + 0.2 * took

    def complete(self, batch: list[Request], here: Loop | None = None, soon: bool = False
                 ) -> None:
        """A batch's outputs are ready: time it (with `timed`), and have it delivered
        (`Delivery.complete`)."""
        self.last_batch = len(batch)
        if self._timed and len(batch) == 1 and batch[0].began:
            # A lone run's time is what the lone-run policy reads (several requests' batches
            # share their run: its time per request would be a far smaller figure).
            req = batch[0]
            self._time((time.perf_counter() - req.began) / req.leading_size())
        self.delivery.complete(batch, here, soon)

    def run_alone(self, req: Request, size: int) -> None:
        """On its caller's thread: run a lone request claimed there (`RequestQueue.claim_idle`)
        until its outputs are ready (on a GPU, the caller's thread waits), its outcome set,
        timed (per unit of `size`, its `leading_size`), counted and recorded, not delivered
        (the caller takes it). It launches on the caller's own stream where the backend allows
        (`caller_stream`: no worker state taken on, no hand-over from the caller's stream),
        else with the lead worker's context. A failure of the backend's step before the run is
        `NotStarted` for a replica of a pool, as a queued request's would be."""
        assert self.lead is not None
        ctx, backend, teams, batch = self.lead[0], self._backend, self._teams, [req]
        # `run`'s steps without the queue's `begin`: nobody else holds this request yet; it
        # is RUNNING from its run's start.
        req.began = began = time.perf_counter()
        own = None if teams is None else teams.borrow()
        try:
            stream = backend.caller_stream(req.ready) if self._caller_stream else None
            if stream is not None:
                req.state = RUNNING
                self._executor.run(batch, stream)
                backend.wait_caller_stream(ctx, stream)
            else:
                with backend.here(ctx):  # its inputs are ready (`Backend.caller_idle`)
                    stream = backend.begin_batch(ctx, [])
                    req.state = RUNNING
                    self._executor.run(batch, stream)
                    token = backend.finish(ctx)
                    if token is not None:
                        self._wait_ready(token, batch)
        except Exception as exc:  # the run as a whole failed, not the request
            # As in `run`: a replica's request that had not started may run elsewhere.
            req.error = self.unstarted(exc) if req.state == QUEUED else exc
            req.result = None
            self.fault(exc)
        finally:  # counted over whatever escapes: the model must not stay busy
            if teams is not None:
                teams.give_back(own)
            now = time.perf_counter()
            self._time((now - began) / size)
            self.delivery.finish_alone(req)
        self.delivery.record_alone(req, now)

    def run_here(self, batch: list[Request], busy: int, loop: Loop, soon: bool = False
                 ) -> None:
        """Run a batch on `loop`'s thread and deliver it (`Delivery.complete`'s `soon`): waits
        for its readiness right there if the backend hands a token."""
        token = self.run(None, batch, busy, here=loop)
        if token is not None:
            self.land(token, batch, loop, soon)
        else:
            self.complete(batch, loop, soon)

    def land(self, token: Any, batch: list[Request], here: Loop | None = None,
             soon: bool = False) -> None:
        """Block until an in-flight batch is ready (`_wait_ready`), then complete it
        (`Delivery.complete`'s `here` and `soon`)."""
        self._wait_ready(token, batch)
        self.complete(batch, here, soon)

    def _wait_ready(self, token: Any, batch: list[Request]) -> None:
        """Block (GIL-free in the backend) until a batch is ready; a readiness failure is the
        batch's outcome."""
        try:
            self._backend.wait_ready(token)
        except Exception as exc:
            for req in batch:
                req.error, req.result = exc, None
            self.fault(exc)

    def fault(self, error: BaseException) -> None:
        """A batch failed as a whole (the backend's step, not one request's run)."""
        if self._on_fault is not None:
            self._on_fault(error)


class Workers:
    """`options.workers` threads taking batches off `queue`; the last to exit fails what is
    left queued and calls `on_stopped` (after every run has returned)."""

    def __init__(self, queue: RequestQueue, runner: BatchRunner, backend: Backend,
                 options: RuntimeOptions, on_stopped: Callable[[], None] = lambda: None) -> None:
        self._queue = queue
        self._runner = runner
        self._backend = backend
        self._on_stopped = on_stopped
        self._stopped = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"{options.name}-worker-{i}",
                             daemon=True)
            for i in range(options.workers)
        ]
        for t in self._threads:
            t.start()

    @property
    def stopped(self) -> bool:
        """Every worker has exited and `on_stopped` has run."""
        return self._stopped.is_set()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the workers to exit (all of them, or until `timeout` s have passed)."""
        if timeout is not None:
            deadline = time.monotonic() + timeout
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join(max(0.0, deadline - time.monotonic()))
            return
        for t in self._threads:
            t.join()
        self._stopped.wait()

    def orphaned(self) -> None:
        """In a forked child: no workers, nothing to wait for."""
        self._stopped = threading.Event()
        self._stopped.set()

    def _work(self, index: int) -> None:
        queue, runner, complete = self._queue, self._runner, self._runner.complete
        ready, max_flight = self._backend.ready, self._backend.max_in_flight
        flight: deque[tuple[Any, list[Request]]] = deque()  # launched, not yet ready
        ctx = None
        try:
            ctx = self._backend.start_worker(index)
            runner.enter(index)
            if index == 0:
                runner.lead = (ctx,)
            while True:
                while flight:  # land what is ready, in launch order
                    try:
                        if not ready(flight[0][0]):
                            break
                    except Exception:  # `land` meets it again and hands it to the callers
                        runner.land(*flight.popleft())
                        continue
                    complete(flight.popleft()[1])
                taken = queue.take(index, bool(flight))
                if taken is STOP:
                    return
                if taken is None:
                    runner.land(*flight.popleft())
                    continue
                batch, busy = taken
                token = runner.run(ctx, batch, busy)
                if token is None:
                    if not flight:
                        queue.returning(index)
                    complete(batch)
                else:
                    flight.append((token, batch))
                    if len(flight) > max_flight:
                        runner.land(*flight.popleft())
                del batch, taken
        except BaseException as exc:
            # Not a run's failure (a run's is its requests' outcome): the runtime's own. It
            # ends the model's serving, whatever its other workers (they finish what they run
            # and exit): the requests left and later calls say why, not that it was closed.
            reason = (f"the model's worker {index} failed ({type(exc).__name__}: {exc}); "
                      "it serves no more requests")
            log.error("aioti: %s", reason, exc_info=exc)
            runner.fault(exc)  # a pool's replica: out of routing, its queue handed back
            runner.delivery.fail(queue.fail(reason), runner.unstarted(ClosedError(reason)))
        finally:
            while flight:
                runner.land(*flight.popleft())
            if index == 0 and runner.lead is not None:
                runner.lead = None  # no lone run begins with its context now
                queue.wait_idle()  # and one under way ends first
            if ctx is not None:
                self._backend.stop_worker(ctx)
            leftover = queue.exit_worker()
            if leftover is not None:  # the last worker (a failed one emptied the queue)
                runner.delivery.fail(leftover, ClosedError(
                    "the model's workers stopped before this request ran"))
                try:
                    self._on_stopped()
                finally:
                    self._stopped.set()
