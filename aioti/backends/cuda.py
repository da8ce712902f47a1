"""The CUDA backend: one worker thread per CUDA stream, streams made on the model's device.

- Streams: `workers` per model (default 3), each created on the model's device index in its
  worker thread, which also makes it that thread's current stream so that the model's output
  allocations belong to it.
- Inputs: the caller's current stream is noted when the request is made (a cheap lookup on the
  loop thread). Before a batch, the worker checks each distinct caller stream of the batch: one
  with work still queued gets an event recorded on it, which the worker's stream waits on.
  Checking after the request was made is conservative - it covers all work the caller had
  queued by then, and maybe more - so inputs made asynchronously by the caller are complete,
  for at most one record per stream per batch. (Recording on the loop thread per request cost
  most of the loop's time on an H200 host: the call holds the GIL while it waits for the CUDA
  driver, which the workers keep busy.)
- Readiness: after each batch the worker records an event on its stream and goes on launching
  the next batches (up to `max_in_flight` unfinished); it delivers a batch once its event has
  completed, so an awaited result is ready on any stream, and the loop never blocks on the GPU.
  Inputs stay referenced until then. (Synchronizing the stream after every batch left the GPU
  idle while the worker delivered and waited for new work: with one stream and 64 callers,
  batches shrank to a few runs, each paying a full synchronize.)
- Events and stream checks go straight to the driver with the GIL held (`cuda_driver`): they
  take microseconds, and releasing the GIL around them, as torch's calls do, made the worker
  wait behind the event loop's thread to take it back.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..errors import BackendError
from .base import Backend
from .cuda_driver import Driver, driver

__all__ = ["CudaBackend"]

_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream
)


class CudaBackend(Backend):
    name = "cuda"

    max_in_flight = 3
    # Runs only launch work on the stream: a whole batch in one call. With smaller chunks a lone
    # worker waits for the GIL between chunks while the loop settles results, and the stream
    # runs dry.
    run_chunk = 64

    def __init__(self, device: torch.device) -> None:
        if not torch.cuda.is_available():
            raise BackendError("CUDA is not available (no GPU, or a CPU-only torch build)")
        index = torch.cuda.current_device() if device.index is None else device.index
        count = torch.cuda.device_count()
        if not 0 <= index < count:
            raise BackendError(
                f"device cuda:{index} does not exist: this machine has "
                f"{', '.join(f'cuda:{i}' for i in range(count))}"
            )
        super().__init__(torch.device("cuda", index))
        self._index = index
        self._driver = driver()  # a missing driver library fails the resolve, not a worker

    def default_workers(self) -> int:
        # A fourth worker stream served fewer requests at batch 1 than three and put the loop in
        # a GIL convoy (loop lag p99 7 ms against 1.2 ms: benchmarks/README.md).
        return 3

    def prepare(self, tensors: Sequence[torch.Tensor], *, move_inputs: bool) -> tuple[list[Any], Any]:
        if move_inputs:
            tensors = [t.to(self.device, non_blocking=True) if isinstance(t, torch.Tensor)
                       and t.device != self.device else t for t in tensors]
        return list(tensors), _current_raw_stream(self._index)

    def start_worker(self, index: int) -> _Worker:
        torch.cuda.set_device(self.device)
        stream = torch.cuda.Stream(device=self.device)
        torch.cuda.set_stream(stream)
        return _Worker(stream, self.max_in_flight, self._driver)

    def here(self, ctx: _Worker) -> AbstractContextManager[object]:
        # The model allocates outputs on the calling thread's current stream: the worker's.
        return _Here(ctx.stream, self._driver)

    def caller_idle(self, ready: Any) -> bool:
        # A lone run waits for the GPU on the caller's thread: with work still queued on the
        # caller's stream (a long kernel of another task), it would wait for that too, holding
        # the event loop. A worker's stream waits for it on the GPU instead.
        if ready is None:
            return True
        device = torch._C._cuda_getDevice()
        if device == self._index:
            self._driver.bind(self._index)
            return self._driver.idle(ready)
        # A stream of this device (0: its legacy stream), queried with this device current.
        torch._C._cuda_setDevice(self._index)
        try:
            return self._driver.idle(ready)
        finally:
            torch._C._cuda_setDevice(device)

    def caller_stream(self, ready: Any) -> int | None:
        # The caller's current stream on this device, noted by `prepare` just before; usable
        # as the thread stands when this device is the thread's current one (the model's
        # outputs are allocated on the current device's current stream).
        if ready is not None and torch._C._cuda_getDevice() == self._index:
            self._driver.bind(self._index)
            return ready  # type: ignore[no-any-return]
        return None

    def wait_caller_stream(self, ctx: _Worker, stream: int) -> None:
        ctx.driver.record(ctx.lone, stream)
        ctx.driver.synchronize(ctx.lone)

    def begin_batch(self, ctx: _Worker, readies: list[Any]) -> int:
        own = ctx.raw
        for raw in set(readies):
            if raw is not None and raw != own and not ctx.driver.idle(raw):
                # One event per worker, re-recorded: creating one per batch cost two more
                # driver calls (create, destroy) on every batch. The pair under the worker's
                # lock: a lone run on a caller's thread may begin with the lead's context while
                # the lead begins a batch, and the stream must wait on its own caller's record.
                with ctx.lock:
                    ctx.driver.record(ctx.event, raw)
                    ctx.driver.stream_wait(own, ctx.event)
        return own

    def finish(self, ctx: _Worker) -> tuple[Driver, int]:
        # The dispatcher lands batches in order and keeps at most `max_in_flight` unfinished,
        # so the ring's next event has been waited on before it is recorded again.
        event = ctx.done[ctx.next_done]
        ctx.next_done = (ctx.next_done + 1) % len(ctx.done)
        ctx.driver.record(event, ctx.raw)
        return ctx.driver, event

    def ready(self, token: tuple[Driver, int]) -> bool:
        return token[0].query(token[1])

    def wait_ready(self, token: tuple[Driver, int]) -> None:
        token[0].synchronize(token[1])

    def stop_worker(self, ctx: _Worker) -> None:
        for event in (ctx.event, ctx.lone, *ctx.done):
            ctx.driver.destroy_event(event)


class _Here:
    """A worker's stream made the calling thread's current one (its device with it, and that
    device's context: `Driver.bind`), the caller's stream and device put back after: torch's
    own C calls, a few microseconds where `torch.cuda.stream` takes several Python frames each
    way."""

    __slots__ = ("_target", "_driver", "_device", "_saved")

    def __init__(self, stream: torch.cuda.Stream, driver: Driver) -> None:
        self._target = (stream.stream_id, stream.device_index, stream.device_type)
        self._driver = driver

    def __enter__(self) -> None:
        self._device = torch._C._cuda_getDevice()
        self._saved = torch._C._cuda_getCurrentStream(self._target[1])
        torch._C._cuda_setStream(*self._target)  # sets its device current too
        self._driver.bind(self._target[1])

    def __exit__(self, *exc: object) -> None:
        torch._C._cuda_setStream(*self._saved)
        if torch._C._cuda_getDevice() != self._device:
            torch._C._cuda_setDevice(self._device)


class _Worker:
    """A CUDA worker's context: its stream, the event its stream waits on callers with (and the
    lock it is recorded and waited on under), a ring of events that mark its batches done, and
    (the lead's) the event a lone run on a caller's stream is waited for with (driver handles,
    made on the worker's device)."""

    __slots__ = ("stream", "raw", "driver", "event", "done", "next_done", "lone", "lock")

    def __init__(self, stream: torch.cuda.Stream, in_flight: int, driver: Driver) -> None:
        self.stream = stream  # kept alive: `raw` is its handle
        self.raw: int = stream.cuda_stream
        self.driver = driver
        self.event = driver.create_event()
        self.done = [driver.create_event() for _ in range(in_flight + 1)]
        self.next_done = 0
        self.lone = driver.create_event()
        self.lock = threading.Lock()
