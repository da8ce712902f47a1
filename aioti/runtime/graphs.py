"""CUDA graph replay: a model's run captured once per batch size and worker, then replayed with
one launch instead of one per kernel (launch-bound models run several times faster).

`GraphRunner.run_many` stands in for `Container.run_many` under either executor (plain or
batched): a run whose inputs fit a captured graph is copied into the graph's static inputs on
the worker's stream, replayed, and its outputs copied out (the caller owns them); any other run
goes to the container as before.

- Capture: at load, and again after a constant operation that may move the constants (a swap,
  a fold, a user-managed or blob update: `ConstantBuffers.generation`), with runs held off. Each
  worker gets its own set of graphs (its own static tensors, one memory pool per graph); sizes
  are captured smallest first until `max_memory_mb` would be passed. A capture runs through the
  container's `RunSingleThreaded`, after warm-up runs; the ordinary `Run` queries events and
  cannot be captured. Each set is captured on a stream of its own that nothing else uses:
  cuBLAS keeps a workspace per stream, which the captured kernels use whichever stream replays
  them, so graphs captured on one stream and replayed by two workers at once would share it.
- Order: a worker's replays are queued on its stream under its set's lock, each one's copies
  in, launch and copies out together. A lone run on a caller's thread replays the lead's set
  on the lead's stream while the lead may be queueing a batch of another loop's requests there:
  without the lock, one's launch could run on the other's inputs.
- Padding: a run of n rows replays the smallest captured size >= n when the model's rows are
  independent (the batching probe says so), its outputs sliced back to n; otherwise only runs of
  exactly a captured size replay.
- Safety: graphs captured for an older constant generation are never replayed (those runs go
  to the container until the recapture). A capture that fails (a model that synchronizes, or a
  library without `RunSingleThreaded`) turns graphs off with a warning naming the reason.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..backends.cuda_driver import driver
from ..core import runmany
from ..errors import InputError, ModelRunError, check_count, check_duration
from .batching import probe_batch_dim

if TYPE_CHECKING:
    from ..core.container import Container

__all__ = ["CudaGraphs", "GraphRunner"]

_LAUNCH = 2**64 - 1  # an op's size that marks a graph launch (runmany.c: aioti_replay_many)


@dataclass(frozen=True)
class CudaGraphs:
    """Options of CUDA graph replay (off unless passed to `aioti.load(..., cuda_graphs=...)`).

    `batch_sizes`: the sizes of the batch dim (`dim`) captured, per worker; `max_memory_mb`
    bounds the memory of all captured graphs (None: no bound); `warmup`: runs before each
    capture."""

    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    max_memory_mb: float | None = None
    dim: int = 0
    warmup: int = 2

    def __post_init__(self) -> None:
        sizes = self.batch_sizes
        if not isinstance(sizes, Sequence) or isinstance(sizes, str) or not sizes:
            raise ValueError(f"batch_sizes must be sizes >= 1, got {sizes!r}")
        for n in sizes:
            check_count("each of batch_sizes", n)
        if self.max_memory_mb is not None:
            check_duration("max_memory_mb", self.max_memory_mb, positive=True)
        check_count("dim", self.dim, None)
        check_count("warmup (capture needs a run before it)", self.warmup)


class _Graph:
    """One captured run: the graph, its static inputs and outputs, its memory; and for a
    replay through the driver (`direct`), the instantiated graph's handle and the static
    tensors' addresses."""

    __slots__ = ("graph", "inputs", "outputs", "nbytes", "size", "direct", "in_ptrs",
                 "out_ptrs")

    def __init__(self, graph: Any, inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                 nbytes: int, size: int, dim: int) -> None:
        self.graph, self.inputs, self.outputs, self.nbytes = graph, inputs, outputs, nbytes
        self.size = size
        handle = getattr(graph, "raw_cuda_graph_exec", None)
        # Rows are whole bytes ranges of contiguous tensors batched at dim 0: a replay is then
        # copies, a launch and copies, each one driver call.
        self.direct: int | None = handle() if handle is not None and dim == 0 and all(
            t.is_contiguous() for t in inputs + outputs) else None
        self.in_ptrs = [t.data_ptr() for t in inputs]
        self.out_ptrs = [t.data_ptr() for t in outputs]


class _Set:
    """One worker's graphs by batch size, and the lock its replays are queued under."""

    __slots__ = ("graphs", "lock")

    def __init__(self, graphs: dict[int, _Graph]) -> None:
        self.graphs = graphs
        self.lock = threading.Lock()


class GraphRunner:
    """Graph replay for one replica's container and its `workers` worker streams."""

    def __init__(self, container: Container, options: CudaGraphs, workers: int) -> None:
        self.container = container
        self.options = options
        self.device = container.device
        if self.device.type != "cuda":
            raise InputError(f"cuda_graphs needs a CUDA device; this model is on {self.device}")
        sig = container.signature
        found = sig.batch_range(options.dim)
        if found is None or not sig.known:
            raise InputError(
                f"cuda_graphs needs one dynamic batch size at dim {options.dim} and inputs "
                f"of known shapes; this model's inputs are "
                f"{[s.describe() for s in sig.inputs]}")
        symbol, high, self._carries = found
        others = {size for s in sig.inputs for size in (s.sizes or ())
                  if isinstance(size, str) and size != symbol}
        if others:
            raise InputError(
                f"cuda_graphs captures static shapes: every dim but the batch dim must be "
                f"static, and this model has other dynamic sizes ({', '.join(sorted(others))})")
        self.sizes = sorted({int(n) for n in options.batch_sizes if high is None or n <= high})
        self.workers = workers
        self._sets: list[_Set] = []
        self._by_stream: dict[int, _Set] = {}
        self._lock = threading.Lock()
        self._generation = -1
        self._capture_streams: list[torch.cuda.ExternalStream] = []
        self._driver = driver()
        self._addresses = self._driver.addresses
        self._first = self._carries.index(True)  # an input that carries the batch dim
        self.pad = False
        self.disabled: str | None = None
        self.replays = 0
        self.fallbacks = 0
        self.captures = 0

    # --- capture -------------------------------------------------------------------------------

    @property
    def captured(self) -> list[int]:
        """The sizes captured for every worker."""
        if not self._sets:
            return []
        return sorted(set.intersection(*(set(s.graphs) for s in self._sets)))

    @property
    def stale(self) -> bool:
        """Whether the constants moved since the graphs were captured (they are not replayed)."""
        return self.disabled is None and self._generation != self.container.buffers.generation

    def capture(self) -> None:
        """(Re)capture every worker's graphs. No run of the container may be in flight: at
        load, or with the replica's runs held off."""
        torch.cuda.synchronize(self.device)  # replays in flight still read the old graphs
        self._drop()
        if self.disabled is not None:
            return
        if not self.container.buffers.loaded:
            self._disable("the model has no weights yet")
            return
        if self._generation == -1:  # first capture: may a run be padded to a larger size?
            reason = probe_batch_dim(self.container.run_tensors, self.container.signature,
                                     self.device, self.options.dim)
            self.pad = reason is None
        budget = (self.options.max_memory_mb * 2**20 if self.options.max_memory_mb is not None
                  else None)
        used = 0
        skipped: list[int] = []
        generation = self.container.buffers.generation
        try:
            while len(self._capture_streams) < self.workers:
                with torch.cuda.device(self.device):
                    raw = self._driver.create_stream()
                self._capture_streams.append(torch.cuda.ExternalStream(raw, device=self.device))
            for side in self._capture_streams:
                graphs: dict[int, _Graph] = {}
                for n in self.sizes:
                    if budget is not None and used >= budget:
                        skipped.append(n)
                        continue
                    g = self._capture_one(n, side)
                    if budget is not None and used + g.nbytes > budget:
                        skipped.append(n)
                        del g
                        continue
                    graphs[n] = g
                    used += g.nbytes
                self._sets.append(_Set(graphs))
        except Exception as exc:  # not capturable: plain runs from here on
            self._drop()
            self._end_failed_capture()
            self._disable(f"{type(exc).__name__}: {exc}")
            return
        finally:
            torch.cuda.synchronize(self.device)
        self._generation = generation
        if skipped:
            warnings.warn(
                f"cuda_graphs: sizes {sorted(set(skipped))} not captured for every worker: "
                f"max_memory_mb={self.options.max_memory_mb} reached ({used / 2**20:.1f} MiB "
                "captured); those runs go without graphs", RuntimeWarning, stacklevel=2)

    def _capture_one(self, n: int, side: torch.cuda.Stream) -> _Graph:
        """Warm up, then capture a run of `n` rows on `side` (this set's own stream)."""
        c = self.container
        before = torch.cuda.memory_reserved(self.device)
        inputs = self._static_inputs(n)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.options.warmup):
                c.capture_run(inputs, side.cuda_stream)
        side.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=torch.cuda.graph_pool_handle(), stream=side,
                              capture_error_mode="thread_local"):
            outputs = c.capture_run(inputs, side.cuda_stream)
        self.captures += 1
        return _Graph(graph, inputs, outputs, torch.cuda.memory_reserved(self.device) - before, n,
                      self.options.dim)

    def _static_inputs(self, n: int) -> list[torch.Tensor]:
        d = self.options.dim
        out = []
        for spec, carries in zip(self.container.signature.inputs, self._carries):
            assert spec.sizes is not None and spec.dtype is not None
            shape = [n if carries and i == d else int(s)  # type: ignore[call-overload]
                     for i, s in enumerate(spec.sizes)]
            out.append(torch.zeros(shape, dtype=spec.dtype, device=self.device))
        return out

    def _end_failed_capture(self) -> None:
        """A failed capture leaves torch's CUDA random generators marked as capturing (torch
        ends that only when a capture succeeds), and the device's random ops then raise; an
        empty capture that succeeds ends it."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "the CUDA graph is empty"
                with torch.cuda.device(self.device):
                    with torch.cuda.graph(torch.cuda.CUDAGraph(),
                                          capture_error_mode="thread_local"):
                        pass
        except Exception:  # noqa: BLE001 - best effort: graphs are off either way
            pass

    def _disable(self, reason: str) -> None:
        self.disabled = reason
        warnings.warn(f"cuda_graphs turned off, runs go without graphs: {reason}",
                      RuntimeWarning, stacklevel=3)

    def _drop(self) -> None:
        with self._lock:
            self._sets.clear()
            self._by_stream.clear()
        torch.cuda.empty_cache()  # the dropped graphs' pools

    # --- runs ----------------------------------------------------------------------------------

    def run_many(self, batch: Sequence[Sequence[torch.Tensor]], stream: int | None
                 ) -> list[list[torch.Tensor] | Exception]:
        """`Container.run_many`, replaying graphs where a run fits one."""
        own = (self._graphs(stream) if stream is not None
               and self._generation == self.container.buffers.generation else None)
        if own is None or stream is None:
            self.fallbacks += len(batch)
            return self.container.run_many(batch, stream)
        out: list[list[torch.Tensor] | Exception | None] = [None] * len(batch)
        direct: list[tuple[int, _Graph, int]] = []
        for i, inputs in enumerate(batch):
            fit = self._fit(own.graphs, inputs)
            if fit is None:
                continue
            g, rows = fit
            if g.direct is not None and all(t.is_contiguous() for t in inputs):
                direct.append((i, g, rows))
            else:
                with own.lock:
                    out[i] = self._replay(g, inputs, rows)
        if direct:
            self._replay_direct(batch, direct, out, own, stream)
        rest = [i for i, o in enumerate(out) if o is None]
        self.replays += len(batch) - len(rest)
        if rest:
            self.fallbacks += len(rest)
            for i, ran in zip(rest, self.container.run_many([batch[i] for i in rest], stream)):
                out[i] = ran
        return out  # type: ignore[return-value]

    def _graphs(self, stream: int) -> _Set | None:
        """This worker stream's graphs (a free set is claimed by a stream on first use)."""
        graphs = self._by_stream.get(stream)
        if graphs is not None:
            return graphs
        with self._lock:
            taken = {id(g) for g in self._by_stream.values()}
            free = [g for g in self._sets if id(g) not in taken]
            if not free or torch.cuda.current_stream(self.device).cuda_stream != stream:
                return None  # replays go on the thread's current stream: it must be the run's
            self._by_stream[stream] = free[0]
            return free[0]

    def _fit(self, graphs: dict[int, _Graph], inputs: Sequence[torch.Tensor]
             ) -> tuple[_Graph, int] | None:
        """The graph that `inputs` fit and their rows, or None. Inputs the container checked
        at the call (`check_inputs`, the default) have the model's dtypes, devices and static
        sizes: only their rows are read."""
        if len(inputs) != len(self._carries):
            return None
        d = self.options.dim
        rows = inputs[self._first].shape[d]
        g = graphs.get(rows)
        if g is None and self.pad:
            g = next((graphs[n] for n in self.sizes if n > rows and n in graphs), None)
        if g is None:
            return None
        if not self.container.check_inputs:
            for t, s, c in zip(inputs, g.inputs, self._carries):
                if t.dtype != s.dtype or t.device != s.device or (
                        t.shape[:d] + t.shape[d + 1:] != s.shape[:d] + s.shape[d + 1:] if c
                        else t.shape != s.shape):
                    return None
        return g, rows

    def _replay(self, g: _Graph, inputs: Sequence[torch.Tensor], rows: int
                ) -> list[torch.Tensor]:
        """Replay through torch (tensor copies in and out, `CUDAGraph.replay`) on the worker's
        stream, the thread's current stream."""
        d = self.options.dim
        for t, s, c in zip(inputs, g.inputs, self._carries):
            (s.narrow(d, 0, rows) if c else s).copy_(t, non_blocking=True)
        g.graph.replay()
        if g.size == rows:
            return [o.clone() for o in g.outputs]
        return [o.narrow(d, 0, rows).clone() for o in g.outputs]

    def _replay_direct(self, batch: Sequence[Sequence[torch.Tensor]],
                       direct: list[tuple[int, _Graph, int]],
                       out: list[list[torch.Tensor] | Exception | None], own: _Set,
                       stream: int) -> None:
        """Replay through the driver: each run's inputs copied into its graph's static inputs,
        the graph launched, its outputs copied out, all queued on `stream` in one native call.
        Where rows are independent (every output carries the batch dim), the outputs of the
        chunk's runs are views of one allocation per output."""
        ops: list[int] = []
        shared: list[tuple[torch.Tensor, ...]] | None = None
        if self.pad:
            counts = [rows for _, _, rows in direct]
            total = sum(counts)
            wholes = [torch.empty((total, *o.shape[1:]), dtype=o.dtype, device=o.device)
                      for o in direct[0][1].outputs]
            # A lone run (the common case at low load) skips the split.
            shared = ([w.split(counts) for w in wholes] if len(direct) > 1
                      else [(w,) for w in wholes])
        for k, (i, g, _rows) in enumerate(direct):
            for t, ptr in zip(batch[i], g.in_ptrs):
                ops += (ptr, t.data_ptr(), t.nbytes)
            ops += (g.direct or 0, 0, _LAUNCH)
            if shared is not None:
                results = [views[k] for views in shared]
            else:
                results = [torch.empty(o.shape, dtype=o.dtype, device=o.device)
                           for o in g.outputs]
            for r, ptr in zip(results, g.out_ptrs):
                ops += (r.data_ptr(), ptr, r.nbytes)
            out[i] = results
        with own.lock:
            self._queue(ops, stream)

    def _queue(self, ops: list[int], stream: int) -> None:
        """Queue copies and launches (`_replay_direct`) on `stream`: in one native call, GIL
        released (a launch may wait for room in the GPU's queue), where the native helper is
        built; else one driver call each."""
        native = runmany.replayer()
        if native is None:
            drv = self._driver
            for dst, src, n in zip(ops[0::3], ops[1::3], ops[2::3]):
                if n == _LAUNCH:
                    drv.launch_graph(dst, stream)
                else:
                    drv.copy(dst, src, n, stream)
            return
        done = ctypes.c_size_t()
        copy, launch = self._addresses
        code = native(copy, launch, (ctypes.c_uint64 * len(ops))(*ops), len(ops) // 3, stream,
                      ctypes.byref(done))
        if code:
            raise ModelRunError(f"CUDA graph replay failed: {self._driver.describe(code)} "
                                f"(code {code}, after {done.value} of {len(ops) // 3} steps)")

    def stats(self) -> dict[str, Any]:
        return {
            "sizes": self.captured,
            "graphs": sum(len(s.graphs) for s in self._sets),
            "memory_bytes": sum(g.nbytes for s in self._sets for g in s.graphs.values()),
            "padding": self.pad,
            "direct": all(g.direct is not None for s in self._sets for g in s.graphs.values()),
            "replays": self.replays,
            "fallbacks": self.fallbacks,
            "captures": self.captures,
            "stale": self.stale,
            "disabled": self.disabled,
        }
