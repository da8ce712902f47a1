"""What a device backend decides: workers and their streams, input hand-over, readiness, closing.

A backend serves one device (`torch.device`, index resolved). The runtime calls, in order:
`prepare` on the caller's loop thread for each request; `start_worker` once in each worker
thread; `begin_batch` before each batch of runs in that thread, after setting the thread's native
team size from `worker_threads(...)` (waits for the batch's inputs to be ready and returns the
stream handle to pass to the native `Run`); `finish` once after each batch (None when the outputs
are ready to use on any stream, else a token: the worker polls it with `ready`, blocks on it with
`wait_ready`, and delivers the batch once it is ready); `stop_worker` when the worker exits. A
lone request runs on its caller's thread only when `caller_idle` says nothing the caller queued
before it is still pending (the thread would wait for that too), and asks `caller_stream`
first: a stream it may launch on as that thread stands (then `wait_caller_stream`), or None for
the lead worker's steps under `here`.
A backend lives as long as the process: models keep theirs after the registry replaces it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

__all__ = ["Backend"]


class Backend:
    """The CPU-like default: worker threads with no stream, nothing to synchronize."""

    #: device type this backend serves
    name = "cpu"

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def default_workers(self) -> int:
        """Workers per model when `load(..., workers=None)`, before `auto_workers`."""
        return 1

    def auto_workers(self, weight_bytes: int) -> int | None:
        """Given the model's total constant bytes (a proxy of its run time), a better worker
        count, or None to keep `default_workers()`. The container is created with
        `max(default_workers(), max_auto_workers)` model instances."""
        return None

    max_auto_workers = 1

    def worker_threads(self, weight_bytes: int, workers: int) -> tuple[int, int, int] | None:
        """Native threads (OpenMP team size) a model's runs may use, given its constant bytes
        and worker count: on the lead worker (while its batch runs alone, while other batches
        run too), and on every other thread (`ThreadTeams`); None leaves the threads'
        defaults."""
        return None

    def prepare(self, tensors: Sequence[torch.Tensor], *, move_inputs: bool) -> tuple[list[Any], Any]:
        """On the caller's loop thread: inputs as the model will see them, and a readiness token
        the worker waits on (`begin_batch`)."""
        if move_inputs:
            tensors = [t.to(self.device) if isinstance(t, torch.Tensor) else t for t in tensors]
        return list(tensors), None

    def start_worker(self, index: int) -> Any:
        """In worker thread `index` as it starts: its context (e.g. its stream)."""
        return index

    def here(self, ctx: Any) -> AbstractContextManager[object]:
        """On a caller's thread, around a lone run made there with worker context `ctx` (the
        lead's): the thread state the worker's own thread has for its runs (device, current
        stream), the caller's restored afterwards."""
        return nullcontext()

    def caller_idle(self, ready: Any) -> bool:
        """On a caller's thread, before a lone run there: whether the work its request's inputs
        may wait on (`ready`, from `prepare`) is done, so that the run waits for itself only.
        The base has nothing to wait on."""
        return True

    def caller_stream(self, ready: Any) -> int | None:
        """On a caller's thread, for a lone run made there: the caller's own stream (from
        `ready`, its request's readiness token) if the run may launch on it as the thread
        stands, with no worker's state taken on; None to run with the lead worker's
        (`here`, `begin_batch`, `finish`)."""
        return None

    def wait_caller_stream(self, ctx: Any, stream: int) -> None:
        """Block until the lone run just queued on `stream` (from `caller_stream`) has
        completed, not for what other threads queue there after it; `ctx` is the lead
        worker's context (lone runs of a model are one at a time)."""

    def begin_batch(self, ctx: Any, readies: list[Any]) -> int | None:
        """In the worker, before a batch of runs: wait for the requests' readiness tokens;
        returns the stream handle for `Run` (None: the default stream / CPU)."""
        return None

    #: requests a worker begins and runs in one native call, and without batching the most it
    #: takes at a wake-up: larger chunks take the GIL back less often; smaller ones leave more
    #: of a worker's taken requests open to cancellation and hand results back sooner
    run_chunk = 16

    #: batches a worker may have launched whose outputs are not ready yet (see `finish`)
    max_in_flight = 0

    def finish(self, ctx: Any) -> Any:
        """In the worker, after a batch of runs: None once their outputs are ready for any
        stream, or a token for `ready` and `wait_ready` (the worker then goes on launching
        batches, up to `max_in_flight` unfinished, and delivers this one once it is ready)."""
        return None

    def ready(self, token: Any) -> bool:
        """In the worker: whether the batch behind a `finish` token is ready (no blocking)."""
        return True

    def wait_ready(self, token: Any) -> None:
        """In the worker: block until the batch behind a `finish` token is ready."""

    def stop_worker(self, ctx: Any) -> None:
        """In the worker thread as it exits."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.device}>"
