"""`Dispatcher`: a model's runtime, put together - the queue, its workers (or on-loop runs),
delivery and the process lifecycle - behind the calls the facade makes.

The facade makes a `Request` on the caller's loop and `submit`s it (queued at once when there
is room, else it waits for room or gets `QueueFullError`, by option; `ClosedError` once closing
began); a worker (or, with `on_loop`, the caller's loop) runs it through the executor and
delivers its outcome; a caller that leaves `cancel`s it. `exclusive()` holds off runs for
constant mutations the native container does not synchronize. `shutdown` stops admission and
lets the workers finish (failing queued requests with `cancel_queued`); the last worker to exit
calls `on_stopped` (deleting the native container) after every run has returned. In a forked
child every dispatcher is closed at once: its worker threads did not come along.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from ..backends.base import Backend
from ..core.threads import ThreadTeams
from ..errors import ClosedError, QueueFullError
from ..loops import Loop
from ..loops.parking import ParkingLot
from . import lifecycle
from .delivery import Delivery
from .executor import Executor
from .inline import OnLoop
from .options import RuntimeOptions
from .queue import CLOSED, RequestQueue
from .request import NotStarted, Request
from .worker import BatchRunner, Workers

__all__ = ["IDLE_RUN_MAX_S", "Dispatcher"]

#: a lone request runs on its caller's thread only while its run is expected to take less than
#: this (from the recent runs, measured from a batch's start until its outputs were seen ready,
#: which on a worker overstates what the run would hold its caller's thread for): longer would
#: hold the event loop
IDLE_RUN_MAX_S = 250e-6


class Dispatcher:
    def __init__(self, executor: Executor, backend: Backend, options: RuntimeOptions, *,
                 teams: ThreadTeams | None = None,
                 on_stopped: Callable[[], None] = lambda: None,
                 on_fault: Callable[[BaseException], None] | None = None,
                 room: ParkingLot | None = None) -> None:
        self.options = options
        self.queue = queue = RequestQueue(options, room)
        self.delivery = Delivery(queue)
        self.runner = runner = BatchRunner(queue, self.delivery, executor, backend, teams,
                                           on_fault, timed=options.idle_on_loop,
                                           caller_stream=options.idle_on_caller_stream)
        self._on_loop = OnLoop(queue, runner) if options.on_loop else None
        self._on_stopped = on_stopped
        self._caller_idle = backend.caller_idle
        self._ran_here_on: Loop | None = None  # the loop that ran a request this iteration
        #: lone requests run on their caller's thread so far (`run_here_if_idle`)
        self.ran_here = 0
        if self._on_loop is not None:
            queue.on_loop_run = self._on_loop.run
        #: queue a request if there is room (with `on_loop`, scheduling a run on its loop);
        #: the queue's own method, a call less per request than one that picks
        self.try_submit: Callable[[Request], bool] = (
            queue.try_put if self._on_loop is None else queue.put_here)
        lifecycle.track(self)
        self._workers = Workers(queue, runner, backend, options, self._stopped)

    @property
    def closing(self) -> bool:
        return self.queue.closing

    @property
    def closed_reason(self) -> str:
        return self.queue.closed_reason

    @property
    def fault(self) -> str | None:
        """Why the runtime stopped serving when no one closed it (a worker failed, the
        process forked); None while it serves or once closed as asked."""
        reason = self.queue.closed_reason
        return reason if self.queue.closing and reason != CLOSED else None

    @property
    def stopped(self) -> bool:
        """Every worker has exited and the native container is gone."""
        return self._workers.stopped

    def run_here_if_idle(self, req: Request) -> bool:
        """With `options.idle_on_loop`: run a lone request right here, on its caller's thread,
        when the model is idle, its run is expected to take under `IDLE_RUN_MAX_S` (the recent
        runs' time per unit of leading size, times this request's: a request much bigger than
        the recent ones goes to a worker, however short theirs were), the last
        batch its workers completed held one request (more says concurrent callers, whose
        requests the run would hold up on this thread, and on a GPU behind its wait), this
        loop ran none so in its current iteration, and nothing its inputs may wait on is still
        pending (`Backend.caller_idle`: on a GPU, the caller's stream has no work left, which
        the thread would wait for too): no thread hand-off, no worker to wake.
        Its outcome is set in it, for the caller to take after yielding to the loop's ready tasks
        once (as a queued request's caller does). False, doing nothing, otherwise."""
        loop = req.loop
        runner = self.runner
        size = req.leading_size()
        if (runner.per_row_s * size > IDLE_RUN_MAX_S or runner.last_batch > 1
                or self._ran_here_on is loop or runner.lead is None
                or (req.ready is not None and not self._caller_idle(req.ready))
                or not self.queue.claim_idle(req)):
            return False
        # One such run at a time: the requests of a burst made by the loop's other ready tasks,
        # which run before its caller resumes (`ran_here_over`), go to the workers.
        self._ran_here_on = loop
        self.ran_here += 1
        try:
            runner.run_alone(req, size)
        except BaseException:  # (KeyboardInterrupt...) its caller never resumes to say so
            self._ran_here_on = None
            raise
        return True

    def ran_here_over(self, loop: Loop) -> None:
        """The caller of a request run here has yielded to its loop's ready tasks once."""
        if self._ran_here_on is loop:
            self._ran_here_on = None

    async def submit(self, req: Request, *, wait: bool = True) -> None:
        """Queue `req`, waiting for room while the queue is full (or raising `QueueFullError`
        when `wait` is False)."""
        while not self.try_submit(req):
            if not wait:
                raise QueueFullError(
                    f"the request queue is full ({self.queue.max_queue} waiting); try again later"
                )
            await self.queue.wait_for_room()

    def cancel(self, req: Request) -> None:
        self.queue.cancel(req)

    def hand_back(self, error: BaseException) -> None:
        """Give every queued request back to its caller unrun (`NotStarted`): this replica
        failed, and they may run on another."""
        self.delivery.fail(self.queue.drain(), NotStarted(error))

    def stats(self) -> dict[str, Any]:
        return {**self.queue.counts(), "healthy": not self.queue.closing, "fault": self.fault,
                "workers": self.options.workers,
                "ran_on_caller_thread": self.ran_here,
                "max_queue": self.options.max_queue,
                "latency_s": self.delivery.latency.percentiles(50, 90, 99)}

    def exclusive(self) -> AbstractContextManager[None]:
        """Hold off new batches and wait for running ones (blocks: call it from a thread)."""
        return self.queue.exclusive()

    def shutdown(self, *, cancel_queued: bool = False, wait: float | None = None) -> None:
        """Stop admission and let the workers finish; `wait` seconds to join them (None: don't)."""
        dropped = self.queue.close(cancel_queued=cancel_queued)
        self.delivery.fail(dropped, ClosedError("the model was closed before this request ran"))
        if wait is not None:
            self._workers.join(wait)

    def join(self) -> None:
        """Block until every worker has exited and `on_stopped` has run."""
        self._workers.join()

    def orphaned(self) -> None:
        """In a forked child: closed, with no workers; the native container is left alone (its
        worker state did not come along)."""
        self.queue.orphaned()
        self._workers.orphaned()

    def _stopped(self) -> None:
        try:
            self._on_stopped()
        finally:
            lifecycle.forget(self)
