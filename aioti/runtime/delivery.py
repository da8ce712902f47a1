"""Delivery: finished requests back to the tasks awaiting them, each on its own event loop.

A batch is counted as over first (a caller that reads `stats()` once resumed finds its request
counted), then its requests are grouped by loop: one `send` per loop per batch (batches sent
while the loop is busy share one wake-up: `loops.mailbox`), or settled in place when the
delivering thread is that loop's own (on-loop runs).
Settling skips waiters whose task stopped waiting; a loop that has closed drops its outputs.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

from ..loops import Loop
from .queue import RequestQueue
from .request import CANCELLED, DONE, NotStarted, Request
from .stats import Latencies

__all__ = ["Delivery", "warn_on_loop"]


def warn_on_loop(message: str) -> None:
    """A RuntimeWarning from code that runs in an event loop's callback (a delivery, an on-loop
    run). Warnings made errors (`-W error`) are dropped there: raised from a callback, one
    would end a trio run (TrioInternalError) and reach no caller."""
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    except Exception:  # noqa: BLE001 - see above
        pass


class Delivery:
    def __init__(self, queue: RequestQueue) -> None:
        self._queue = queue
        #: from each request's creation to its delivery on its loop
        self.latency = Latencies()
        #: called on the loop with each delivered batch's (latencies, queue waits) in seconds
        self.observers: list[Callable[[list[float], list[float]], object]] = []
        self._failed_observers: list[Callable[..., object]] = []

    def complete(self, batch: list[Request], here: Loop | None = None,
                 soon: bool = False) -> None:
        """A taken batch's outcomes are set (or it failed): count it over, then deliver
        (`soon`: those of `here` once its ready tasks have run, rather than at once)."""
        self.deliver(self.finish(batch), here, soon)

    def finish(self, batch: list[Request]) -> list[Request]:
        """A taken batch's outcomes are set (or it failed): count it over; returns its
        requests whose callers still wait, marked done."""
        done = []
        bad = handed = rows = 0
        for req in batch:
            req.inputs = None
            rows += req.rows
            if req.state == CANCELLED:
                req.result = None  # outputs released here
                continue
            req.state = DONE
            done.append(req)
            if req.error is not None:
                if isinstance(req.error, NotStarted):
                    handed += 1  # to run elsewhere: neither completed nor failed here
                else:
                    bad += 1
        self._queue.finish(rows, len(done) - bad - handed, bad)
        return done

    def fail(self, reqs: list[Request], error: BaseException) -> None:
        """Deliver `error` to requests that never ran (not counted: they were not taken)."""
        for req in reqs:
            req.error, req.inputs = error, None
        self.deliver(reqs)

    def deliver(self, reqs: list[Request], here: Loop | None = None, soon: bool = False
                ) -> None:
        """Hand requests with an outcome to their loops, one send per loop; those of `here`,
        the loop whose thread this is, are settled at once (`soon`: after its ready tasks)."""
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
                if soon:
                    here.soon(self._settle, group)
                else:
                    self._settle(group)
            else:
                group[0].loop.send(self._settle, group)  # a closed loop: outputs dropped

    def _settle(self, reqs: list[Request]) -> None:
        """On the requests' loop (one loop per call)."""
        reqs[0].loop.settle_all(reqs)
        self.record(reqs)

    def finish_alone(self, req: Request) -> None:
        """`finish` for a lone request run on its caller's thread (`BatchRunner.run_alone`),
        without a batch's lists: per-request work on the caller's loop. Its caller, on this
        thread, cannot have left meanwhile."""
        req.inputs = None
        req.state = DONE
        error = req.error
        if error is None:
            self._queue.finish(req.rows, 1, 0)
        else:  # one handed back (`NotStarted`) is neither completed nor failed here
            self._queue.finish(req.rows, 0, 0 if isinstance(error, NotStarted) else 1)

    def record_alone(self, req: Request, now: float) -> None:
        """`record` for a lone request run on its caller's thread, its outputs ready at
        `now`."""
        latency = now - req.t0
        self.latency.add(latency)
        if self.observers:
            self._observe([latency], [req])

    def record(self, reqs: list[Request]) -> None:
        """On the requests' loop, as they are handed over: their latencies and queue waits."""
        now = time.perf_counter()
        latencies = [now - req.t0 for req in reqs]
        self.latency.extend(latencies)
        if self.observers:
            self._observe(latencies, reqs)

    def _observe(self, latencies: list[float], reqs: list[Request]) -> None:
        for observe in self.observers:
            try:
                observe(latencies, [req.began - req.t0 for req in reqs if req.began])
            except Exception as exc:  # noqa: BLE001 - a user's observer must not stop delivery
                self._observer_failed(observe, exc)

    def _observer_failed(self, observe: Callable[..., object], exc: Exception) -> None:
        """An observer raised: said once per observer (it is still called). Raised on, it would
        reach the loop from a callback: trio ends its run on that (TrioInternalError), and
        asyncio would log it for every batch."""
        if observe in self._failed_observers:
            return
        self._failed_observers.append(observe)
        warn_on_loop(f"aioti: the observer {observe!r} raised {type(exc).__name__}: {exc} "
                     "(ignored; the requests were delivered)")
