"""The CUDA backend: one worker thread per CUDA stream, streams made on the model's device.

- Streams: `workers` per model (default 4), each created on the model's device index in its
  worker thread, which also makes it that thread's current stream so that the model's output
  allocations belong to it.
- Inputs: on the caller's thread an event is recorded on the caller's current stream; the worker's
  stream waits on it before the batch, so inputs made asynchronously by the caller are complete.
  One event per (caller thread, stream) is re-recorded rather than a new one made per request:
  a worker that waits on a later record of it waits at least as long as it must, never less.
- Readiness: after each batch the worker synchronizes its stream, so an awaited result is ready on
  any stream; the loop never blocks on the GPU. Inputs stay referenced until then.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import BackendError
from .base import Backend

__all__ = ["CudaBackend"]

_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream
)


class CudaBackend(Backend):
    name = "cuda"

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
        self._events = threading.local()  # per caller thread: raw stream -> (stream, event)

    def default_workers(self) -> int:
        return 4

    def prepare(self, tensors: Sequence[torch.Tensor], *, move_inputs: bool) -> tuple[list[Any], Any]:
        if move_inputs:
            tensors = [t.to(self.device, non_blocking=True) if isinstance(t, torch.Tensor)
                       and t.device != self.device else t for t in tensors]
        tensors = list(tensors)
        events = self._events.__dict__
        raw = _current_raw_stream(self._index)
        entry = events.get(raw)
        if entry is None:
            entry = events[raw] = (torch.cuda.current_stream(self.device), torch.cuda.Event())
        entry[1].record(entry[0])
        return tensors, entry[1]

    def start_worker(self, index: int) -> torch.cuda.Stream:
        torch.cuda.set_device(self.device)
        stream = torch.cuda.Stream(device=self.device)
        torch.cuda.set_stream(stream)
        return stream

    def begin_batch(self, ctx: torch.cuda.Stream, readies: list[Any]) -> int:
        seen: set[int] = set()
        for event in readies:
            if event is not None and id(event) not in seen:
                seen.add(id(event))
                ctx.wait_event(event)
        return ctx.cuda_stream

    def finish(self, ctx: torch.cuda.Stream) -> None:
        ctx.synchronize()
