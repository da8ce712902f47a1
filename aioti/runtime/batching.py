"""Dynamic batching: concurrent requests that agree on everything but the batch dim run as one.

Policy (stated in docs/batching.md):
- A worker takes queued requests up to `max_batch_size` rows at a wake-up. It lingers for more
  only while demand is high (its previous batch merged more than one request) and only until
  the queue holds a full batch of rows or the oldest request has waited `max_delay_ms`; a lone
  caller never waits.
- Taken requests are grouped by signature (every input's dtype and non-batch sizes) in queue
  order; each group is cut into runs of at most `max_batch_size` rows and at most the batch dim's
  exported maximum. A request larger than that runs alone.
- Inputs are checked per request before queueing, so a bad request fails alone. If a merged run
  fails, its requests are run one by one, so a failure reaches only the request that causes it.
- Outputs are split back along the batch dim; the model is refused at load if a probe shows an
  output that does not carry the batch dim, or rows whose results depend on each other.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.signature import Layout, Signature
from ..errors import InputError, check_count, check_duration
from .executor import RunMany
from .request import Request
from .stats import Latencies

__all__ = ["BatchExecutor", "Batching", "probe_batch_dim"]


@dataclass(frozen=True)
class Batching:
    """Options of dynamic batching (off unless passed to `aioti.load(..., batching=...)`).

    `on_loop=True` runs each batch on the event loop's own thread, once the loop has run the
    tasks that are ready, instead of handing it to a worker thread: for CPU models whose batched
    run takes microseconds, where the two thread hand-offs cost more than the run. The loop is
    blocked for each batched run; `max_delay_ms` does not apply (a batch is what the loop's
    tasks queued meanwhile)."""

    max_batch_size: int = 64
    max_delay_ms: float = 2.0
    dim: int = 0
    on_loop: bool = False

    def __post_init__(self) -> None:
        check_count("max_batch_size", self.max_batch_size)
        check_duration("max_delay_ms", self.max_delay_ms)
        check_count("dim", self.dim, None)


RunOne = Callable[[list[torch.Tensor], "int | None"], list[torch.Tensor]]


class BatchExecutor:
    """The executor of a batched model: merges a batch's live requests by group, runs each
    merged chunk once, and splits the outputs back (`Executor`'s protocol, with the whole batch
    as one chunk). `max_rows` caps merged runs further (CUDA graphs: the largest captured
    size)."""

    def __init__(self, config: Batching, signature: Signature, run_many: RunMany,
                 max_rows: int | None = None) -> None:
        self.dim = config.dim
        found = signature.batch_range(config.dim)
        if found is None:
            raise InputError(
                f"batching needs one batch size at dim {config.dim}: a dynamic size there that "
                f"no other dim uses; this model's inputs are "
                f"{[s.describe() for s in signature.inputs]}"
            )
        _, dim_max, self.carries = found
        self._all_carry = all(self.carries)
        #: rows a merged run holds at most: the option, within the batch dim's compiled range
        self.max_rows = min(config.max_batch_size, dim_max or config.max_batch_size,
                            max_rows or config.max_batch_size)
        #: a taken batch is executed as one chunk (merging needs every request of it)
        self.chunk = self.max_rows
        self._run_many = run_many
        # A request's (group key, rows), by the `Layout` its checked inputs had, and by the
        # inputs' dtypes and shapes (a model whose every input carries the batch dim), which
        # serves unchecked inputs too.
        self._by_layout: dict[Layout, tuple[Hashable, int]] = {}
        self._by_shapes: dict[tuple[Any, ...], tuple[Hashable, int]] = {}
        self._lock = threading.Lock()
        self._sizes: Counter[int] = Counter()
        self._runs = 0
        self.queue_wait = Latencies()

    def admit(self, req: Request, layout: Layout | None = None) -> None:
        """On the caller's thread: set `req.key` (its group) and `req.rows`. `layout` is the
        checked inputs' layout (`Signature.check`), if any."""
        if layout is not None and (found := self._by_layout.get(layout)) is not None:
            req.key, req.rows = found
            return
        tensors = req.inputs
        assert tensors is not None
        shapes: tuple[Any, ...] | None = None
        if self._all_carry:
            if len(tensors) == 1:
                t = tensors[0]
                shapes = (t.dtype, t.shape)
            else:
                shapes = tuple([(t.dtype, t.shape) for t in tensors])
            found = self._by_shapes.get(shapes)
            if found is not None:
                req.key, req.rows = found
                if layout is not None:
                    self._remember(self._by_layout, layout, found)
                return
        d = self.dim
        # Inputs without the batch dim are shared by a merged run: only requests passing the
        # very same tensor (unmodified) merge, so such keys are never kept.
        key = tuple([(t.dtype, t.shape[:d] + t.shape[d + 1:]) if c else (id(t), t._version)
                     for t, c in zip(tensors, self.carries)])
        first = self.carries.index(True)
        req.key, req.rows = key, int(tensors[first].shape[d])
        if shapes is not None:
            self._remember(self._by_shapes, shapes, (key, req.rows))
            if layout is not None:
                self._remember(self._by_layout, layout, (key, req.rows))

    @staticmethod
    def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
        if len(cache) >= 1024:
            cache.clear()
        cache[key] = value

    def stats(self) -> dict[str, Any]:
        with self._lock:
            hist = dict(sorted(self._sizes.items()))
            runs = self._runs
        return {"runs": runs, "batch_rows": hist, "max_rows": self.max_rows,
                "queue_wait_s": self.queue_wait.percentiles(50, 99)}

    def run(self, live: list[Request], stream: int | None) -> None:
        """Group, merge, run, split."""
        now = time.perf_counter()
        self.queue_wait.extend([now - r.t0 for r in live])
        max_rows = self.max_rows
        for reqs in _groups(live):
            rows = [r.rows for r in reqs]
            if sum(rows) <= max_rows:
                self._run_chunk(stream, reqs, rows)
                continue
            start = total = 0
            for i, n in enumerate(rows):
                if total and total + n > max_rows:
                    self._run_chunk(stream, reqs[start:i], rows[start:i])
                    start, total = i, 0
                total += n
            self._run_chunk(stream, reqs[start:], rows[start:])

    def _run_alone(self, stream: int | None, reqs: list[Request]) -> None:
        """Each request its own run (one native call for them all)."""
        for r, out in zip(reqs, self._run_many([r.inputs for r in reqs], stream)):  # type: ignore[misc]
            if isinstance(out, Exception):
                r.error = out
            else:
                r.result = out

    def _run_chunk(self, stream: int | None, chunk: list[Request], rows: list[int]) -> None:
        total = sum(rows)
        with self._lock:
            self._sizes[total] += 1
            self._runs += 1
        if len(chunk) == 1:
            self._run_alone(stream, chunk)
            return
        d = self.dim
        try:
            merged = [torch.cat(parts, d) if c else parts[0]
                      for parts, c in zip(zip(*[r.inputs for r in chunk]), self.carries)]  # type: ignore[misc]
            (outputs,) = self._run_many([merged], stream)
            if isinstance(outputs, Exception):
                raise outputs
            if any(o.dim() <= d or o.shape[d] != total for o in outputs):
                raise RuntimeError("an output does not carry the batch dim")
            pieces = [o.split_with_sizes(rows, d) for o in outputs]
        except Exception:
            self._run_alone(stream, chunk)  # isolate the failure to the request(s) causing it
            return
        if len(pieces) == 1:
            for r, p in zip(chunk, pieces[0]):
                r.result = [p]
        else:
            for r, *ps in zip(chunk, *pieces):
                r.result = ps


def _groups(reqs: list[Request]) -> Iterable[list[Request]]:
    """`reqs` split by grouping key, in queue order (one group, without a dict, when all agree)."""
    key = reqs[0].key
    for r in reqs:
        if r.key is not key and r.key != key:
            by_key: dict[Any, list[Request]] = {}
            for q in reqs:
                by_key.setdefault(q.key, []).append(q)
            return by_key.values()
    return (reqs,)


def probe_batch_dim(run_one: RunOne, signature: Signature, device: torch.device, dim: int
                    ) -> str | None:
    """Run batches of 2 and 3 random rows (zeros for non-float inputs); the reason batching
    cannot work, or None: no shared dynamic dim, an output without it, or rows that depend on
    each other."""
    found = signature.batch_range(dim)
    if found is None:
        return (f"no single batch size at dim {dim} (a dynamic size there that no other dim "
                "uses)")
    _, _, carries = found
    runs = []
    for rows in (2, 3):
        try:
            inputs = signature.example(device, rows)
        except InputError as exc:
            return str(exc)
        if [t.shape[dim] for t, c in zip(inputs, carries) if c] != [rows] * sum(carries):
            return f"dim {dim} cannot be {rows} within the compiled range"
        runs.append((inputs, _synced(run_one(inputs, None), device)))
    for i, (a, b) in enumerate(zip(runs[0][1], runs[1][1])):
        if a.dim() <= dim or (a.shape[dim], b.shape[dim]) != (2, 3):
            return (f"output {i} does not carry the batch dim (shapes {tuple(a.shape)} at 2 rows, "
                    f"{tuple(b.shape)} at 3)")
    # Rows 0-1 and 1-2 of the 3-row batch, run as batches of their own, must give the same rows:
    # a model that mixes rows (a batch mean, say) would answer differently once merged.
    inputs, merged = runs[1]
    for start in (0, 1):
        part = [t.narrow(dim, start, 2) if c else t for t, c in zip(inputs, carries)]
        for i, (alone, together) in enumerate(zip(_synced(run_one(part, None), device), merged)):
            if not _close(alone, together.narrow(dim, start, 2)):
                return (f"output {i}: a row's result depends on the other rows of its batch "
                        "(rows run together and apart differ: a batch statistic, or randomness "
                        "in the model), so merging requests would change their results")
    return None


def _synced(outs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return outs


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding that a different batch size may cause in kernels."""
    if not a.dtype.is_floating_point:
        return torch.equal(a, b)
    tol = 1e-4 if a.element_size() >= 4 else 2e-2
    return torch.allclose(a.float(), b.float(), rtol=10 * tol, atol=tol, equal_nan=True)
