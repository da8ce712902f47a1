"""Fakes that let the runtime's parts run without a compiled model or an event loop: a loop
whose posts go to a plain queue, and an executor that answers with its inputs doubled."""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from aioti.backends.base import Backend
from aioti.runtime.request import Request


class PlainWaiter:
    """A waiter nobody awaits: settling records the outcome."""

    def __init__(self) -> None:
        self.outcome: tuple[Any, BaseException | None] | None = None
        self.cancelled = False

    def done(self) -> bool:
        return self.cancelled or self.outcome is not None


class PlainLoop:
    """A "loop" whose posts land in a plain queue; the test runs them (`drain`)."""

    kind = "plain"

    def __init__(self) -> None:
        self.posted: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def waiter(self) -> PlainWaiter:
        return PlainWaiter()

    def post(self, fn: Any, arg: Any) -> bool:
        self.posted.put((fn, arg))
        return True

    soon = send = post  # one post per send: the tests count them

    def settle_all(self, items: Any) -> None:
        for item in items:
            if not item.waiter.done():
                item.waiter.outcome = (item.result, item.error)

    def drain(self, posts: int, timeout: float = 10.0) -> list[Any]:
        """Run `posts` posted calls (waiting up to `timeout` s for each); their arguments."""
        args = []
        for _ in range(posts):
            fn, arg = self.posted.get(timeout=timeout)
            fn(arg)
            args.append(arg)
        return args


class DoublingExecutor:
    """Runs each request as `inputs[0] * 2`; records the batches it ran; `gate` (when set)
    holds every run until it is opened; `fail` makes inputs equal to it fail."""

    def __init__(self, chunk: int = 16) -> None:
        self.chunk = chunk
        self.runs: list[list[Request]] = []
        self.gate: threading.Event | None = None
        self.started = threading.Event()

    def run(self, live: list[Request], stream: int | None) -> None:
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10), "the test never opened the gate"
        self.runs.append(list(live))
        for req in live:
            x = req.inputs[0]  # type: ignore[index]
            if isinstance(x, torch.Tensor) and bool((x < 0).any()):
                req.error = ValueError("negative input")
            else:
                req.result = [x * 2]


class TokenBackend(Backend):
    """Batches finish later: `finish` hands out numbered tokens, ready once the test says."""

    max_in_flight = 3

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.issued = 0
        self.released: set[int] = set()
        self.cond = threading.Condition()

    def finish(self, ctx: Any) -> int:
        self.issued += 1
        return self.issued

    def ready(self, token: int) -> bool:
        with self.cond:
            return token in self.released

    def wait_ready(self, token: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: token in self.released, 10), token

    def release(self, token: int) -> None:
        with self.cond:
            self.released.add(token)
            self.cond.notify_all()
