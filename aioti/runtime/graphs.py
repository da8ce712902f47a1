"""CUDA graph replay: a model's run captured once per batch size and worker, then replayed with
one launch instead of one per kernel (launch-bound models run several times faster).

`GraphRunner.run_many` stands in for `Container.run_many` under either executor (plain or
batched): a run whose inputs fit a captured graph is copied into the graph's static inputs on
the worker's stream, replayed, and its outputs copied out (the caller owns them); any other run
goes to the container as before.

- Copies: where rows are whole byte ranges (batch dim 0, contiguous tensors), the copies in and
  out are nodes of the graph itself, captured from and to a scratch buffer; before each launch
  the driver points them at the run's inputs and outputs (`cuGraphExecMemcpyNodeSetParams`,
  which affects later launches only). A replay is then one launch, and the GPU runs the copies
  inside it, without a gap between separately queued operations. Such a graph must never be
  replayed without setting its copy nodes first (torch's `CUDAGraph.replay` would copy from
  and to whatever the last replay set). Other graphs replay through torch, tensor copies around
  `CUDAGraph.replay`.

- Capture: at load, and again after a constant operation that may move the constants (a swap,
  a fold, a user-managed or blob update: `ConstantBuffers.generation`), with runs held off. Each
  worker gets its own set of graphs (its own static tensors, one memory pool per graph); sizes
  are captured smallest first until `max_memory_mb` would be passed. A capture runs through the
  container's `RunSingleThreaded`, after warm-up runs; the ordinary `Run` queries events and
  cannot be captured. Each set is captured on a stream of its own that nothing else uses:
  cuBLAS keeps a workspace per stream, which the captured kernels use whichever stream replays
  them, so graphs captured on one stream and replayed by two workers at once would share it.
- Order: a worker's replays are queued on its stream under its set's lock, each one's copy
  nodes set and its launch together (the driver's graph objects are not thread-safe either).
  A lone run on a caller's thread replays the lead's set on the lead's stream while the lead
  may be queueing a batch of another loop's requests there: without the lock, one's launch
  could run on the other's inputs.
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
from ..errors import BackendError, InputError, check_count, check_duration
from .batching import probe_batch_dim

if TYPE_CHECKING:
    from ..core.container import Container

__all__ = ["CudaGraphs", "GraphRunner"]

_OP = 5  # words per op of `_replay_direct` (runmany.c: aioti_replay_many)


def _take_node(found: list[tuple[int, int, int, int]], dst: int, src: int, nbytes: int
               ) -> int | None:
    """The copy node of `found` (node, dst, src, nbytes) that copies `nbytes` from `src` to
    `dst`, taken out of `found`; None for an empty copy (the capture made none)."""
    if not nbytes:
        return None
    for k, (node, d, s, n) in enumerate(found):
        if (d, s, n) == (dst, src, nbytes):
            del found[k]
            return node
    raise RuntimeError(f"the captured graph has no copy node of {nbytes} bytes from {src:#x} "
                       f"to {dst:#x}")


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
    replay through the driver (`direct`: the instantiated graph's handle), the copy nodes that
    the capture put before and after the run, each input's and output's (None for an empty
    one), with the static tensors' addresses."""

    __slots__ = ("graph", "inputs", "outputs", "nbytes", "size", "direct", "in_nodes",
                 "out_nodes", "in_ptrs", "out_ptrs", "spare")

    def __init__(self, graph: Any, inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                 nbytes: int, size: int, direct: int | None = None,
                 in_nodes: list[int | None] | None = None,
                 out_nodes: list[int | None] | None = None) -> None:
        self.graph, self.inputs, self.outputs, self.nbytes = graph, inputs, outputs, nbytes
        self.size = size
        self.direct = direct
        self.in_nodes = in_nodes or []
        self.out_nodes = out_nodes or []
        self.in_ptrs = [t.data_ptr() for t in inputs]
        self.out_ptrs = [t.data_ptr() for t in outputs]
        #: the outputs of this graph's next lone direct replay, allocated after the last one
        #: was launched (while the GPU ran it), with the rows they were made for
        self.spare: tuple[int, list[torch.Tensor]] | None = None


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
        self._context = self._driver.primary_context(
            torch.cuda.current_device() if self.device.index is None else self.device.index)
        self._scratches: list[torch.Tensor] = []
        self._first = self._carries.index(True)  # an input that carries the batch dim
        self.pad = False
        self.disabled: str | None = None
        self.replays = 0
        self.fallbacks = 0
        self.failed_steps = 0
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
        """Warm up, then capture a run of `n` rows on `side` (this set's own stream). Where
        replays can go through the driver (rows at dim 0, contiguous static tensors, a torch
        that keeps the captured graph), the capture puts a copy node before the run for each
        input and after it for each output, from and to a scratch buffer; each replay points
        them at its own inputs and outputs (`_replay_direct`)."""
        c = self.container
        before = torch.cuda.memory_reserved(self.device)
        inputs = self._static_inputs(n)
        side.wait_stream(torch.cuda.current_stream(self.device))
        warm: list[torch.Tensor] = []
        with torch.cuda.stream(side):
            for _ in range(self.options.warmup):
                warm = c.capture_run(inputs, side.cuda_stream)
        side.synchronize()
        graph = None
        if self.options.dim == 0 and all(t.is_contiguous() for t in inputs + warm):
            try:
                graph = torch.cuda.CUDAGraph(keep_graph=True)
            except TypeError:  # a torch without it: these replays go through torch
                pass
        nodes = graph is not None
        if graph is None:
            graph = torch.cuda.CUDAGraph()
        scratch = self._scratch(max(t.nbytes for t in inputs + warm)) if nodes else 0
        del warm
        raw = side.cuda_stream
        with torch.cuda.graph(graph, pool=torch.cuda.graph_pool_handle(), stream=side,
                              capture_error_mode="thread_local"):
            if nodes:
                for t in inputs:
                    self._driver.copy(t.data_ptr(), scratch, t.nbytes, raw)
            outputs = c.capture_run(inputs, raw)
            if nodes:
                for o in outputs:
                    self._driver.copy(scratch, o.data_ptr(), o.nbytes, raw)
        self.captures += 1
        nbytes = torch.cuda.memory_reserved(self.device) - before
        if not nodes:
            return _Graph(graph, inputs, outputs, nbytes, n)
        if not all(o.is_contiguous() for o in outputs):
            raise RuntimeError("the captured run's outputs are not contiguous")
        graph.instantiate()
        found = self._driver.copy_nodes(graph.raw_cuda_graph())
        return _Graph(graph, inputs, outputs, nbytes, n, graph.raw_cuda_graph_exec(),
                      [_take_node(found, t.data_ptr(), scratch, t.nbytes) for t in inputs],
                      [_take_node(found, scratch, o.data_ptr(), o.nbytes) for o in outputs])

    def _scratch(self, nbytes: int) -> int:
        """The address of device memory of at least `nbytes` that capture copy nodes copy from
        and to (a replay points them elsewhere first), kept while the graphs live. Allocated
        inside a capture's measure, it counts in that graph's `nbytes`."""
        if not self._scratches or self._scratches[-1].nbytes < nbytes:
            self._scratches.append(torch.empty(nbytes, dtype=torch.uint8, device=self.device))
        return self._scratches[-1].data_ptr()

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
            self._scratches.clear()
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
        direct: list[tuple[int, _Graph, int, Sequence[torch.Tensor]]] = []
        for i, inputs in enumerate(batch):
            fit = self._fit(own.graphs, inputs)
            if fit is None:
                continue
            g, rows = fit
            if g.direct is not None:
                if not all(t.is_contiguous() for t in inputs):  # (unchecked inputs only)
                    inputs = [t.contiguous() for t in inputs]
                direct.append((i, g, rows, inputs))
            else:
                with own.lock:
                    out[i] = self._replay(g, inputs, rows)
        if direct:
            self._replay_direct(direct, out, own, stream)
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
        if not rows:
            return None
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

    def _replay_direct(self, direct: list[tuple[int, _Graph, int, Sequence[torch.Tensor]]],
                       out: list[list[torch.Tensor] | Exception | None], own: _Set,
                       stream: int) -> None:
        """Replay through the driver: for each run (index, graph, rows, inputs), its graph's
        copy nodes pointed at its inputs and at new outputs, and the graph launched (copies
        in, run and copies out in one launch), all queued on `stream` in one native call. A
        lone run (the common case at low load) copies out into its graph's spare outputs, and
        the next spare is allocated once the run is queued: off the path from the call to the
        launch, while the GPU runs it. Where rows are independent (every output carries the
        batch dim), the outputs of a chunk of several runs are views of one allocation per
        output. A run whose steps fail is left without outputs: it runs without a graph."""
        if len(direct) == 1:
            i, g, rows, inputs = direct[0]
            with own.lock:
                spare = g.spare
                results = spare[1] if spare is not None and spare[0] == rows else \
                    self._outputs(g, rows)
                if self._queue(self._ops(inputs, g, results), stream) is not None:
                    return
                g.spare = rows, self._outputs(g, rows)
            out[i] = results
            return
        ops: list[int] = []
        ends: list[int] = []
        shared: list[tuple[torch.Tensor, ...]] | None = None
        if self.pad:
            counts = [rows for _, _, rows, _ in direct]
            shared = [w.split(counts) for w in self._outputs(direct[0][1], sum(counts))]
        for k, (i, g, rows, inputs) in enumerate(direct):
            results = ([views[k] for views in shared] if shared is not None
                       else self._outputs(g, rows))
            ops += self._ops(inputs, g, results)
            ends.append(len(ops) // _OP)
            out[i] = results
        with own.lock:
            done = self._queue(ops, stream)
        if done is not None:
            for (i, *_), end in zip(direct, ends):
                if end > done:  # its launch was not queued
                    out[i] = None

    def _outputs(self, g: _Graph, rows: int) -> list[torch.Tensor]:
        """New tensors for the outputs of a direct replay of `rows` rows on `g` (rows at dim
        0 where they are independent; else `g`'s own shapes, `rows` then being its size)."""
        return [torch.empty((rows, *o.shape[1:]) if self.pad else o.shape, dtype=o.dtype,
                            device=o.device) for o in g.outputs]

    @staticmethod
    def _ops(inputs: Sequence[torch.Tensor], g: _Graph, results: list[torch.Tensor]
             ) -> list[int]:
        """One direct replay's steps (`_queue`): `g`'s copy nodes set to copy `inputs` in and
        out into `results`, then `g` launched."""
        ops: list[int] = []
        e = g.direct or 0
        for t, node, ptr in zip(inputs, g.in_nodes, g.in_ptrs):
            if node is not None:
                ops += (e, node, ptr, t.data_ptr(), t.nbytes)
        for r, node, ptr in zip(results, g.out_nodes, g.out_ptrs):
            if node is not None:
                ops += (e, node, r.data_ptr(), ptr, r.nbytes)
        ops += (e, 0, 0, 0, 0)
        return ops

    def _queue(self, ops: list[int], stream: int) -> int | None:
        """Do the steps of `_replay_direct` (`_OP` words each) on `stream`: in one native call,
        GIL released (a launch may wait for room in the GPU's queue), where the native helper
        is built; else one driver call each. None, or where one failed, the number of steps
        done before it (said once with a warning: the driver refused to point a copy node at
        a tensor, say, whose memory it cannot reach that way)."""
        native = runmany.replayer()
        count = len(ops) // _OP
        if native is None:
            drv = self._driver
            for k in range(count):
                e, node, dst, src, n = ops[k * _OP:(k + 1) * _OP]
                try:
                    if node:
                        drv.set_copy(e, node, dst, src, n, self._context)
                    else:
                        drv.launch_graph(e, stream)
                except BackendError as exc:
                    self._failed(str(exc))
                    return k
            return None
        done = ctypes.c_size_t()
        set_copy, launch = self._addresses
        code = native(set_copy, launch, self._context, (ctypes.c_uint64 * len(ops))(*ops),
                      count, stream, ctypes.byref(done))
        if code:
            self._failed(f"CUDA {self._driver.describe(code)} (code {code})")
            return done.value
        return None

    def _failed(self, reason: str) -> None:
        self.failed_steps += 1
        if self.failed_steps == 1:
            warnings.warn(f"cuda_graphs: a replay step failed ({reason}); runs whose replay "
                          "was not queued go without graphs (stats()['cuda_graphs']"
                          "['failed_steps'] counts such failures)", RuntimeWarning,
                          stacklevel=2)

    def stats(self) -> dict[str, Any]:
        return {
            "sizes": self.captured,
            "graphs": sum(len(s.graphs) for s in self._sets),
            "memory_bytes": sum(g.nbytes for s in self._sets for g in s.graphs.values()),
            "spare_bytes": sum(t.nbytes for s in self._sets for g in s.graphs.values()
                               if g.spare is not None for t in g.spare[1]),
            "padding": self.pad,
            "direct": all(g.direct is not None for s in self._sets for g in s.graphs.values()),
            "replays": self.replays,
            "fallbacks": self.fallbacks,
            "failed_steps": self.failed_steps,
            "captures": self.captures,
            "stale": self.stale,
            "disabled": self.disabled,
        }
