"""Executors: what runs a batch's live requests. The one thing that differs between a plain
model and a batched one (and, later, one replayed from CUDA graphs).

The runtime (`worker.BatchRunner`) owns the rest of a batch's life: it leaves out cancelled
requests, cuts the batch into chunks of `chunk` requests, and hands each chunk's live requests
to `run` with the worker's stream. `run` sets each request's outcome (`result`, the flat
outputs, or `error`) and never raises for one request's failure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from .request import Request

#: `Container.run_many`, or what stands in for it (`graphs.GraphRunner.run_many`)
RunMany = Callable[[Sequence[Sequence["torch.Tensor"]], "int | None"], list[Any]]

__all__ = ["Executor", "PlainExecutor", "RunMany"]


class Executor(Protocol):
    #: requests begun and run per `run` call; the rest of a taken batch stays open to
    #: cancellation until its chunk begins
    chunk: int

    def run(self, live: list[Request], stream: int | None) -> None:
        """In the worker (or an on-loop run): run `live` on `stream`, setting their outcomes."""
        ...


class PlainExecutor:
    """Each request its own run, a chunk of them in one native call (`Container.run_many`)."""

    def __init__(self, run_many: RunMany, chunk: int) -> None:
        self.chunk = chunk
        self._run_many = run_many

    def run(self, live: list[Request], stream: int | None) -> None:
        for req, out in zip(live, self._run_many([req.inputs for req in live], stream)):  # type: ignore[misc]
            if isinstance(out, Exception):
                req.error = out
            else:
                req.result = out
