"""`Request`: one call's unit of work, from the caller's loop through a worker and back.

Its life: QUEUED (made and queued by the caller) -> RUNNING (a worker began it) -> DONE (its
outcome is set and delivered), or CANCELLED (its caller left: a queued one never runs, a running
one's outputs are dropped).
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

from ..loops import Loop, Waiter

__all__ = ["CANCELLED", "DONE", "NotStarted", "QUEUED", "RUNNING", "Request"]

QUEUED, RUNNING, DONE, CANCELLED = range(4)


class Request:
    """Inputs in; an outcome (`result` or `error`) out, delivered to `waiter` on `loop`."""

    __slots__ = ("inputs", "ready", "loop", "waiter", "state", "result", "error", "t0", "began",
                 "key", "rows")

    def __init__(self, inputs: list[Any], ready: Any, loop: Loop) -> None:
        #: the flat inputs, checked (released once the request has run)
        self.inputs: list[Any] | None = inputs
        #: the backend's readiness token for the inputs (on CUDA: the caller's stream)
        self.ready = ready
        self.loop = loop
        self.waiter: Waiter = loop.waiter()
        self.state = QUEUED
        self.result: Any = None
        self.error: BaseException | None = None
        self.t0 = time.perf_counter()
        #: when its batch began (`time.perf_counter()`; 0.0 until then)
        self.began = 0.0
        #: with batching: the group whose requests may run merged (None: every request alone)
        self.key: Hashable = None
        #: what the request counts toward a full batch: its rows with batching, else 1
        self.rows = 1

    def leading_size(self) -> int:
        """Its first input's leading size, at least 1 (1 for a scalar or a non-tensor; for a
        batch-first model, its rows): what the time of its run is taken to grow with. Read
        before the request has run (its inputs are released after)."""
        shape = getattr(self.inputs[0], "shape", None) if self.inputs else None
        # (any object may come here unchecked, with `check_inputs=False`: a worker must not
        # fail on it)
        if isinstance(shape, tuple) and shape and isinstance(shape[0], int):
            return max(1, shape[0])
        return 1

    def __repr__(self) -> str:
        state = ("queued", "running", "done", "cancelled")[self.state]
        return f"<Request {state}, {self.rows} rows>"


class NotStarted(Exception):
    """A request handed back unrun, because its replica failed (`error`): the facade submits it
    again to another replica; a caller never sees this exception."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"not started: {error}")
        self.error = error
