"""`RuntimeOptions`: how a model's runtime queues, batches and runs requests, in one object.

The names are the public API's: `workers` and `max_queue` of `aioti.load`, `max_batch_size`,
`max_delay_ms` and `on_loop` of `aioti.Batching` (without batching, a worker still takes up to
`max_batch_size` requests at a wake-up, the backend's `run_chunk`, but never waits for more).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import check_count, check_duration

__all__ = ["RuntimeOptions"]


@dataclass(frozen=True)
class RuntimeOptions:
    #: worker threads (each with its own execution context: a CUDA stream, or nothing on CPU)
    workers: int = 1
    #: requests that may wait in the queue; more wait for room or get `QueueFullError`
    max_queue: int = 1024
    #: what a batch holds at most, in rows (a request counts its rows; 1 without batching)
    max_batch_size: int = 64
    #: under demand, how long a worker may wait for a fuller batch (0: never waits)
    max_delay_ms: float = 0.0
    #: batches run on the submitting event loop's thread instead of a worker's
    on_loop: bool = False
    #: a lone request to an idle model whose runs take microseconds runs on its caller's thread
    idle_on_loop: bool = False
    #: such a lone run launches on its caller's own current stream, where the backend allows
    #: (`Backend.caller_stream`), instead of taking on the lead worker's (not with CUDA graphs:
    #: their captured sets belong to the workers' streams)
    idle_on_caller_stream: bool = False
    #: worker threads are named after it
    name: str = "aioti"

    def __post_init__(self) -> None:
        for field in ("workers", "max_queue", "max_batch_size"):
            check_count(field, getattr(self, field))
        check_duration("max_delay_ms", self.max_delay_ms)

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0
