"""The async facade: `AsyncModel`, what `aioti.load(...)` returns.

`AsyncModel` flattens pytree calls by the model's call spec, checks inputs on the caller's loop
(so a bad request fails at once and never reaches a worker), queues the request to the model's
dispatcher and awaits the result. Constant mutations go through one cross-loop async lock; their
blocking native calls run in threads, never on the loop.

Semantics in brief (docs/concurrency.md has the full statement):
- cancellation: a request cancelled while queued never runs; one cancelled while running
  finishes in its worker and its outputs are dropped (unless already sent to the caller's loop,
  whose caller then gets them); the caller sees the cancellation at once.
- ordering: requests start in the order they were queued (per worker, FIFO from one queue).
- close: `aclose()` stops admission, lets queued and running requests finish (or fails queued
  ones with `ClosedError` when `cancel_queued=True`), joins the workers, then deletes the native
  container. Later calls raise `ClosedError`. Closing twice is fine.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import anyio
import torch
import torch.utils._pytree as pytree

from .backends.base import Backend
from .core.container import Container
from .core.package import ModelFiles
from .core.threads import team_of_one
from .errors import ClosedError, InputError
from .loops import current_loop
from .loops.lock import CrossLoopLock
from .replica import Replica
from .runtime import lifecycle
from .runtime.dispatch import Dispatcher
from .runtime.graphs import GraphRunner
from .runtime.request import Request

__all__ = ["AsyncModel"]

T = TypeVar("T")


async def _ran_here(dispatcher: Dispatcher, req: Request) -> list[torch.Tensor]:
    """The outcome of a request run on its caller's thread (`Dispatcher.run_here_if_idle`),
    taken after yielding to the loop's ready tasks once, as a queued request's caller does."""
    try:
        await req.loop.checkpoint()
    finally:
        dispatcher.ran_here_over(req.loop)
    if req.error is not None:
        raise req.error
    return req.result  # type: ignore[no-any-return]


async def _in_thread(fn: Callable[[], T]) -> T:
    """A constant operation's blocking step, in a thread; none starts once the interpreter is
    exiting, and exit waits for one in progress (`lifecycle.operation`)."""

    def guarded() -> T:
        with lifecycle.operation(), team_of_one():  # the lead worker owns the OpenMP team
            return fn()

    return await anyio.to_thread.run_sync(guarded)


class AsyncModel:
    """A loaded model served by worker threads; await its calls from asyncio or trio. Loaded on
    several devices, it is one model over a replica per device (`devices`)."""

    def __init__(
        self,
        files: ModelFiles,
        replicas: Sequence[Replica],
        *,
        on_full: Literal["wait", "raise"],
        move_inputs: bool,
    ) -> None:
        self.files = files
        self._replicas = list(replicas)
        first = self._replicas[0]
        container = first.container
        self.backend = first.backend
        self.device = first.device
        #: the device of each replica
        self.devices = [r.device for r in self._replicas]
        self.check_inputs = container.check_inputs
        self._container = container
        self._dispatcher = first.dispatcher
        self._batcher = first.batcher
        self._idle_on_loop = first.dispatcher.options.idle_on_loop
        self._on_full_wait = on_full == "wait"
        self._move_inputs = move_inputs
        # The base backend's prepare is the identity unless inputs are moved: skip the call.
        self._plain_inputs = type(self.backend).prepare is Backend.prepare and not move_inputs
        self._lock = CrossLoopLock()
        spec = container.call_spec
        self.in_spec = pytree.treespec_loads(spec[0]) if spec and spec[0] else None
        self.out_spec = pytree.treespec_loads(spec[1]) if spec and spec[1] else None
        self.signature = container.signature
        # Fast paths for the common specs: positional tensors in, one tensor out; anything
        # else goes through pytree.
        n = container.num_inputs
        leaf = pytree.tree_structure(0)
        self._positional = self.in_spec is not None and self.in_spec == pytree.tree_structure(
            (tuple(range(n)), {}))
        self._single_out = self.out_spec is not None and self.out_spec == leaf
        self.workers = first.workers
        #: native (OpenMP) threads per run, alone and shared (None: the threads' defaults)
        self.threads = first.threads
        self._closed = False
        self._warned_specialized = False

    # --- what the model is -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once `aclose()` began (or the model was dropped unclosed)."""
        return self._closed

    @property
    def healthy(self) -> bool:
        """True while the model serves requests: not closed, and its workers alive (a worker
        that fails for a reason of the runtime's own stops them; `stats()["fault"]` says
        why). A replica pool is healthy while one of its replicas is."""
        return not (self._closed or self._dispatcher.closing)

    async def check_health(self) -> list[bool]:
        """Each replica's health: whether it serves requests (one entry for a model on one
        device; a replica pool probes its replicas taken out of routing first)."""
        return [self.healthy]

    @property
    def input_names(self) -> list[str]:
        """The model's flat input names, as the library reports them."""
        return list(self._container.input_names)

    @property
    def output_names(self) -> list[str]:
        """The model's flat output names, as the library reports them."""
        return list(self._container.output_names)

    @property
    def call_spec(self) -> tuple[str, str] | None:
        """The serialized (input, output) pytree specs, as the model library reports them."""
        return self._container.call_spec

    @property
    def constant_fqns(self) -> dict[str, str]:
        """Internal constant name -> original FQN, for constants that can be updated."""
        return self._container.constant_fqns

    @property
    def constant_dtypes(self) -> dict[str, torch.dtype | None]:
        """Internal constant name -> dtype."""
        return self._container.constant_dtypes

    @property
    def metadata(self) -> dict[str, str]:
        """The package's metadata for this model (device key, platform, ...)."""
        return dict(self.files.metadata)

    @property
    def container(self) -> Container:
        """The synchronous core container (for introspection; do not run or mutate it directly
        while the model serves)."""
        return self._container

    def stats(self) -> dict[str, Any]:
        """Counts and latency percentiles (s) of requests that entered the queue.

        `queued`: waiting for a worker; `running`: batches taken and not yet finished;
        `completed` / `failed`: requests whose run ended with outputs / an error while their
        caller was still waiting (counted then, so a caller that leaves between that moment and
        the delivery is counted here, not as cancelled); `cancelled`: requests whose caller left
        before that (a queued one never runs; a running one's outputs are dropped). A caller
        that leaves while waiting for room in a full queue never entered it and is not counted;
        nor are requests that closing with `cancel_queued` fails.
        `healthy`: whether the model serves requests (`healthy`); `fault`: why not, where
        no one closed it (else None). `ran_on_caller_thread`: lone requests to the idle model
        run on their caller's thread (docs/concurrency.md). `latency_s`: from the request's
        creation to its delivery on its loop. On CPU, `threads`: the native team sizes of its
        runs (`alone`: the lead's for a batch alone, as tuned among `alone_choices`;
        docs/devices.md)."""
        return self._replicas[0].stats()

    def observe(self, fn: Callable[[list[float], list[float]], object]) -> None:
        """Call `fn(latencies, queue_waits)` (seconds) for each batch of requests delivered,
        on the loop they are delivered to: each request's time from its call to its result, and
        from its call to the start of its batch (for metrics; keep `fn` quick). An exception
        `fn` raises is said once, in a RuntimeWarning, and stops nothing."""
        for r in self._replicas:
            r.dispatcher.delivery.observers.append(fn)

    # --- runs --------------------------------------------------------------------------------

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run on a pytree of inputs, like torch's `AOTICompiledModel.__call__`."""
        if self._positional and not kwargs and len(args) == self._container.num_inputs:
            flat = list(args)
        else:
            flat = self._flatten(args, kwargs)
        outputs = await self._submit(flat)
        if self._single_out:
            return outputs[0]
        return pytree.tree_unflatten(outputs, self.out_spec) if self.out_spec else outputs

    def run(self, inputs: Sequence[torch.Tensor], *, timeout: float | None = None
            ) -> Coroutine[Any, Any, list[torch.Tensor]]:
        """Run on a flat list of tensors; returns the flat list of outputs (a coroutine: the
        request is made when it is awaited)."""
        if type(inputs) is not list and (
                isinstance(inputs, (torch.Tensor, Mapping, str)) or inputs is None):
            # a tensor would be taken row by row, a mapping key by key
            raise TypeError(
                f"run takes a list of tensors (the flat inputs), got {type(inputs).__name__}: "
                "model.run([x]), or call the model on its arguments: model(x)")
        if timeout is None:
            return self._submit(list(inputs))  # one coroutine frame fewer per request
        return self._with_timeout(self._submit(list(inputs)), timeout)

    async def boxed_run(self, inputs: list[torch.Tensor], *, timeout: float | None = None
                        ) -> list[torch.Tensor]:
        """Like `run`, but takes the inputs over: `inputs` is emptied once the request is
        queued, so the model holds the only references and frees them after use."""
        if not isinstance(inputs, list):
            raise TypeError(f"boxed_run takes a list of tensors, got {type(inputs).__name__}")
        return await self._with_timeout(self._submit(inputs, boxed=True), timeout)

    @staticmethod
    async def _with_timeout(coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        if timeout is None:
            return await coro
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) \
                or math.isnan(timeout):
            coro.close()
            raise (ValueError if isinstance(timeout, float) else TypeError)(
                f"timeout must be a number of seconds or None, got {timeout!r}")
        with anyio.fail_after(timeout):
            return await coro

    def _flatten(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        if self.in_spec is None:
            return list(args) + list(kwargs.values())
        from torch.export._tree_utils import reorder_kwargs

        try:
            leaves, spec = pytree.tree_flatten((args, reorder_kwargs(kwargs, self.in_spec)))
        except (ValueError, KeyError, AssertionError) as exc:
            raise InputError(f"arguments do not match the model's signature: {exc}") from exc
        if len(leaves) != self._container.num_inputs:
            # Non-tensor leaves were specialized into the model at export: drop them, as torch.
            dropped = [x for x in leaves if not isinstance(x, torch.Tensor)]
            leaves = [x for x in leaves if isinstance(x, torch.Tensor)]
            if dropped and not self._warned_specialized:
                self._warned_specialized = True
                warnings.warn(
                    f"non-tensor arguments ({', '.join(map(repr, dropped))}) were specialized "
                    "into this model at export: it computes with the values it was exported "
                    "with, whatever is passed (the package does not record them, so aioti "
                    "cannot check; pass tensors, or export once per value)",
                    RuntimeWarning, stacklevel=3)
        elif spec != self.in_spec:
            raise InputError(f"arguments have structure {spec}, the model expects {self.in_spec}")
        return leaves

    async def _submit(self, flat: list[Any], *, boxed: bool = False) -> list[torch.Tensor]:
        dispatcher = self._dispatcher
        if self._closed or dispatcher.closing:  # `_check_open`, inline on the per-request path
            raise ClosedError(dispatcher.closed_reason)
        if self._plain_inputs:
            tensors, ready = (list(flat) if boxed else flat), None
        else:
            tensors, ready = self.backend.prepare(flat, move_inputs=self._move_inputs)
        layout = self.signature.check(tensors, self.device, full=self.check_inputs)
        req = Request(tensors, ready, current_loop())
        if self._batcher is not None:
            self._batcher.admit(req, layout)
        if self._idle_on_loop and dispatcher.run_here_if_idle(req):
            if boxed:
                flat.clear()
            del tensors, flat
            return await _ran_here(dispatcher, req)
        if not dispatcher.try_submit(req):
            await dispatcher.submit(req, wait=self._on_full_wait)
        if boxed:
            flat.clear()
        del tensors, flat
        try:
            return await req.waiter  # type: ignore[no-any-return]
        except BaseException:
            dispatcher.cancel(req)
            raise

    # --- constants ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        """`ClosedError` (saying why: closed, or inherited through a fork) once closing began."""
        if self._closed or self._dispatcher.closing:
            raise ClosedError(self._dispatcher.closed_reason)

    async def _mutate(self, fn: Callable[[Container], T], *, exclusive: bool = False) -> list[T]:
        """Run a blocking constant operation on each replica's container in turn, in a thread,
        under the mutation lock; `exclusive` also holds off runs (for operations the native
        container does not synchronize). Returns each replica's result."""
        self._check_open()

        def call(replica: Replica) -> T:
            if replica.dispatcher.stopped:
                raise ClosedError(replica.dispatcher.closed_reason)
            if not exclusive:
                return fn(replica.container)
            with replica.dispatcher.exclusive():
                return fn(replica.container)

        async with self._mutation():
            return [await _in_thread(functools.partial(call, r)) for r in self._live_replicas()]

    def _live_replicas(self) -> list[Replica]:
        """The replicas constant operations reach (a replica pool leaves out those whose
        workers failed: they never serve again, and their native containers are gone)."""
        return self._replicas

    @contextlib.asynccontextmanager
    async def _mutation(self) -> AsyncIterator[None]:
        """A constant operation: under the mutation lock, and followed, whatever its outcome,
        by the recapture of the CUDA graphs of replicas whose constants it moved (stale graphs
        are not replayed meanwhile)."""
        async with self._lock:
            try:
                yield
            finally:
                await self._recapture()

    async def _recapture(self) -> None:
        """Recapture stale CUDA graphs, each replica's with its runs held off."""
        for r in self._replicas:
            graphs = r.graphs
            if graphs is not None and graphs.stale and not r.dispatcher.stopped:
                def recapture(r: Replica = r, graphs: GraphRunner = graphs) -> None:
                    with r.dispatcher.exclusive():
                        graphs.capture()

                await _in_thread(recapture)

    async def extract_constants(self, *, inactive: bool = False, by_fqn: bool = False
                                ) -> dict[str, torch.Tensor]:
        """Copies of the active (or inactive) buffer's constants, by internal name (or FQN)."""
        self._check_open()
        c = self._live_replicas()[0].container  # every replica holds the same constants
        async with self._lock:
            return await _in_thread(
                lambda: c.buffers.extract_constants(inactive=inactive, by_fqn=by_fqn))

    async def update_constants(
        self,
        mapping: Mapping[str, Any] | str | os.PathLike[str],
        *,
        inactive: bool = False,
        validate_full: bool = False,
        user_managed: bool = False,
    ) -> None:
        """Update constants from a mapping (internal names or FQNs: a `state_dict()` works), a
        `.safetensors` file or a `torch.save`d state_dict. Updating the active buffer waits for
        runs in flight and holds new ones until it is done; the inactive one does not."""
        loaded = await self._read(mapping)
        await self._mutate(
            lambda c: c.buffers.update_constants(
                loaded, inactive=inactive, validate_full=validate_full,
                user_managed=user_managed,
            ),
            exclusive=not inactive,
        )

    async def update_inactive_constants(self, mapping: Mapping[str, Any] | str | os.PathLike[str]
                                        ) -> None:
        """Update the inactive buffer; runs keep going on the active one."""
        await self.update_constants(mapping, inactive=True)

    async def fold_constants(self, *, inactive: bool = False) -> None:
        """Run constant folding on the active (or inactive) buffer; `InputError` for an inactive
        buffer that holds no complete weight set (empty after loading and after a free)."""
        await self._mutate(lambda c: c.buffers.fold_constants(inactive=inactive))

    async def swap_constants(self) -> None:
        """Make the inactive buffer active; runs that started before finish on the old one."""
        await self._mutate(lambda c: c.buffers.swap_constants())

    async def free_inactive_constants(self) -> None:
        """Release the inactive buffer's memory (a later swap needs a new update first).
        `UnsupportedOperation` on a model with runtime constant folding whose inactive buffer
        holds folded constants: torch's container would crash on its next update."""
        await self._mutate(lambda c: c.buffers.free_inactive_constants())

    async def load_constants_from_blob(self, path: str | os.PathLike[str]) -> None:
        """Load the active buffer from a weights blob file (`*_weights.blob` format)."""
        data = await anyio.Path(path).read_bytes()
        await self._mutate(lambda c: c.buffers.load_constants_from_blob(data), exclusive=True)

    async def hot_swap(self, mapping: Mapping[str, Any] | str | os.PathLike[str], *,
                       fold: bool = True) -> None:
        """Update inactive -> fold it (if the model folds) -> swap, as one mutation. The new
        weights are the current ones with `mapping` applied: a partial mapping changes only
        what it names.

        Runs keep flowing on the old weights until the swap, and use the new ones after it. The
        old buffer stays inactive, so `swap_constants()` rolls back. Cancelled midway, the model
        keeps serving the old weights (or, if the swap had begun, the new ones). Closed midway,
        the step in progress returns before the native container goes, and the next raises
        `ClosedError`."""
        self._check_open()
        loaded = await self._read(mapping)
        c = self._container
        folds = fold and c.buffers.folds
        async with self._mutation():
            await _in_thread(lambda: c.buffers.stage_constants(loaded))
            if folds:
                await _in_thread(lambda: c.buffers.fold_constants(inactive=True))
            await _in_thread(c.buffers.swap_constants)

    @staticmethod
    async def _read(mapping: Mapping[str, Any] | str | os.PathLike[str]) -> Mapping[str, Any]:
        """A mapping as is; a weights file read in a thread. Checking and copying happen in the
        mutation's own thread (`ConstantBuffers.update_constants`), before anything changes."""
        if isinstance(mapping, (str, os.PathLike)):
            from .core.weights import read_state_dict

            return await anyio.to_thread.run_sync(read_state_dict, Path(mapping))
        if not isinstance(mapping, Mapping):
            raise TypeError("constants must be a mapping of names to tensors (a state_dict) or "
                            f"a weights file's path, got {type(mapping).__name__}")
        return mapping

    # --- closing -----------------------------------------------------------------------------

    async def aclose(self, *, cancel_queued: bool = False) -> None:
        """Stop admission, finish (or with `cancel_queued`, fail) queued requests, join the
        workers, delete the native container. Idempotent."""
        if self._closed and all(r.dispatcher.stopped for r in self._replicas):
            return
        self._closed = True
        for r in self._replicas:
            r.dispatcher.shutdown(cancel_queued=cancel_queued)
        with anyio.CancelScope(shield=True):
            for r in self._replicas:
                await anyio.to_thread.run_sync(r.dispatcher.join)

    async def __aenter__(self) -> AsyncModel:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        warnings.warn(
            f"aioti model {self.files.name!r} was not closed; use 'async with' or 'await "
            "model.aclose()'", ResourceWarning, stacklevel=2, source=self,
        )
        for r in self._replicas:
            r.dispatcher.shutdown()  # the last worker to exit deletes the container

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.workers} workers"
        return f"<AsyncModel {self.files.name!r} on {self.device}, {state}>"
