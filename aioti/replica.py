"""A replica: one device's copy of a model - its native container, backend, executor and
runtime - as the facade builds it. A model has one replica per device it was loaded on.

`devices(...)` reads what `aioti.load(device=...)` accepts: one device, a list of them, or
`"cuda:*"` for every visible device of that type.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .backends.base import Backend
from .core.container import Container
from .core.threads import ThreadTeams
from .errors import BackendError
from .loops.parking import ParkingLot
from .runtime.batching import BatchExecutor, Batching
from .runtime.dispatch import Dispatcher
from .runtime.executor import PlainExecutor
from .runtime.graphs import CudaGraphs, GraphRunner
from .runtime.options import RuntimeOptions

__all__ = ["Replica", "devices"]



def devices(spec: str | torch.device | Sequence[str | torch.device]) -> list[str | torch.device]:
    """The devices a `device=` argument names; `"TYPE:*"` expands to every visible device of
    that type (`torch.TYPE.device_count()`)."""
    if isinstance(spec, (str, torch.device)):
        spec = [spec]
    elif not isinstance(spec, Sequence):
        raise TypeError("device must be a device name, a torch.device or a list of them, "
                        f"got {spec!r} ({type(spec).__name__})")
    out: list[str | torch.device] = []
    for d in spec:
        if isinstance(d, str) and d.endswith(":*"):
            kind = d[:-2]
            module = getattr(torch, kind, None)
            count = getattr(module, "device_count", None)
            n = count() if callable(count) else 0
            if not n:
                raise BackendError(f"{d!r}: no {kind} device is visible here")
            out += [f"{kind}:{i}" for i in range(n)]
        else:
            out.append(d)
    if not out:
        raise BackendError("device=[]: name at least one device")
    return out


@dataclass
class Replica:
    """One device's share of a model."""

    index: int
    container: Container
    backend: Backend
    dispatcher: Dispatcher
    #: the batched executor (None: each request runs alone)
    batcher: BatchExecutor | None
    workers: int
    #: native (OpenMP) threads per run, alone and shared (None: the threads' defaults)
    threads: ThreadTeams | None
    #: CUDA graph replay (None: off)
    graphs: GraphRunner | None = None

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def stats(self) -> dict[str, Any]:
        """The runtime's counts and latencies, with batching's and CUDA graphs' where on."""
        out = self.dispatcher.stats()
        if self.batcher is not None:
            out["batching"] = self.batcher.stats()
        if self.graphs is not None:
            out["cuda_graphs"] = self.graphs.stats()
        if self.threads is not None:
            t = self.threads
            out["threads"] = {"alone": t.alone_now, "shared": t.shared, "others": t.others,
                              "alone_choices": list(t.choices)}
        return out

    @staticmethod
    def build(index: int, name: str, container: Container, backend: Backend, *, workers: int,
              max_queue: int, batching: Batching | None, threads: ThreadTeams | None,
              room: ParkingLot | None = None,
              on_fault: Callable[[BaseException], None] | None = None,
              cuda_graphs: CudaGraphs | None = None) -> Replica:
        """Wire a replica's runtime: CUDA graphs (captured here) if asked for, the executor
        (plain or batched), its options, and the dispatcher, which deletes the container once
        its workers are gone."""
        graphs = None
        run_many = container.run_many
        if cuda_graphs is not None:
            graphs = GraphRunner(container, cuda_graphs, workers)
            graphs.capture()
            run_many = graphs.run_many  # type: ignore[assignment]
        batcher = None
        executor: BatchExecutor | PlainExecutor
        if batching is not None:
            executor = batcher = BatchExecutor(
                batching, container.signature, run_many,
                max_rows=max(graphs.captured, default=None) if graphs is not None else None)
            options = RuntimeOptions(
                workers=workers, max_queue=max_queue, max_batch_size=executor.max_rows,
                max_delay_ms=0.0 if batching.on_loop else batching.max_delay_ms,
                on_loop=batching.on_loop, name=name)
        else:
            executor = PlainExecutor(run_many, backend.run_chunk)
            # A lone request may run on its caller's thread, while the model's runs are measured
            # short (until outputs are ready): on CPU with one native thread a run (no OpenMP
            # team is forked on the loop's thread); on CUDA, where it launches on the caller's
            # current stream (the lead's, with graphs: theirs are the workers') and waits for
            # the GPU right there.
            kind = backend.device.type
            idle = kind == "cuda" or (
                kind == "cpu" and threads is not None and threads.alone == 1)
            # A worker takes one native call's chunk at most: on CPU it then hands results
            # back while it runs the next, and the loop's callers resubmit beside it (a take
            # of 64 short runs kept the loop idle, then busy in one burst: benchmarks/README.md).
            options = RuntimeOptions(workers=workers, max_queue=max_queue, name=name,
                                     max_batch_size=backend.run_chunk, idle_on_loop=idle,
                                     idle_on_caller_stream=graphs is None)
        dispatcher = Dispatcher(executor, backend, options, teams=threads,
                                on_stopped=container.delete, on_fault=on_fault, room=room)
        return Replica(index, container, backend, dispatcher, batcher, workers, threads, graphs)
