"""The async facade: `aioti.load(...)` and `AsyncModel`.

`AsyncModel` flattens pytree calls by the model's call spec, checks inputs on the caller's loop
(so a bad request fails at once and never reaches a worker), queues the request to the model's
dispatcher and awaits the result. Constant mutations go through one cross-loop async lock; their
blocking native calls run in threads, never on the loop.

Semantics in brief (docs/concurrency.md has the full statement):
- cancellation: a request cancelled while queued never runs; one cancelled while running
  finishes in its worker and its outputs are dropped; the caller sees the cancellation at once.
- ordering: requests start in the order they were queued (per worker, FIFO from one queue).
- close: `aclose()` stops admission, lets queued and running requests finish (or fails queued
  ones with `ClosedError` when `cancel_queued=True`), joins the workers, then deletes the native
  container. Later calls raise `ClosedError`. Closing twice is fine.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

import anyio
import torch
import torch.utils._pytree as pytree

from .backends.base import Backend
from .backends.registry import resolve_backend
from .core.container import Container, open_container
from .core.package import ModelFiles, discard, open_model
from .core.threads import ThreadTeams
from .errors import ClosedError, InputError
from .loops import current_loop
from .loops.lock import CrossLoopLock
from .runtime import lifecycle
from .runtime.batching import BatchExecutor, Batching, probe_batch_dim
from .runtime.dispatch import Dispatcher
from .runtime.executor import PlainExecutor
from .runtime.options import RuntimeOptions
from .runtime.request import Request

__all__ = ["AsyncModel", "ModelLoader", "load"]

T = TypeVar("T")


async def _in_thread(fn: Callable[[], T]) -> T:
    """A constant operation's blocking step, in a thread; none starts once the interpreter is
    exiting, and exit waits for one in progress (`lifecycle.operation`)."""

    def guarded() -> T:
        with lifecycle.operation():
            return fn()

    return await anyio.to_thread.run_sync(guarded)


class AsyncModel:
    """A loaded model served by worker threads; await its calls from asyncio or trio."""

    def __init__(
        self,
        files: ModelFiles,
        container: Container,
        backend: Backend,
        *,
        workers: int,
        max_queue: int,
        on_full: Literal["wait", "raise"],
        move_inputs: bool,
        batching: Batching | None = None,
        threads: ThreadTeams | None = None,
    ) -> None:
        self.files = files
        self.backend = backend
        self.device = backend.device
        self.check_inputs = container.check_inputs
        self._container = container
        self._on_full_wait = on_full == "wait"
        self._move_inputs = move_inputs
        # The base backend's prepare is the identity unless inputs are moved: skip the call.
        self._plain_inputs = type(backend).prepare is Backend.prepare and not move_inputs
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
        # Workers must not reference the model, so that dropping it can be detected.
        self._batcher: BatchExecutor | None = None
        executor: BatchExecutor | PlainExecutor
        if batching is not None:
            executor = self._batcher = BatchExecutor(
                batching, container.signature, container.run_many)
            options = RuntimeOptions(
                workers=workers, max_queue=max_queue, max_batch_size=executor.max_rows,
                max_delay_ms=0.0 if batching.on_loop else batching.max_delay_ms,
                on_loop=batching.on_loop, name=f"aioti-{files.name}")
        else:
            executor = PlainExecutor(container, backend.run_chunk)
            options = RuntimeOptions(workers=workers, max_queue=max_queue,
                                     name=f"aioti-{files.name}")
        self._dispatcher = Dispatcher(executor, backend, options, teams=threads,
                                      on_stopped=container.delete)
        self.workers = workers
        #: native (OpenMP) threads per run, alone and shared (None: the threads' defaults)
        self.threads = threads
        self._closed = False

    # --- what the model is -------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once `aclose()` began (or the model was dropped unclosed)."""
        return self._closed

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
        `latency_s`: from the request's creation to its delivery on its loop."""
        out = self._dispatcher.stats()
        if self._batcher is not None:
            out["batching"] = self._batcher.stats()
        return out

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
        if timeout is None:
            return self._submit(list(inputs))  # one coroutine frame fewer per request
        return self._with_timeout(self._submit(list(inputs)), timeout)

    async def boxed_run(self, inputs: list[torch.Tensor], *, timeout: float | None = None
                        ) -> list[torch.Tensor]:
        """Like `run`, but takes the inputs over: `inputs` is emptied once the request is
        queued, so the model holds the only references and frees them after use."""
        if not isinstance(inputs, list):
            raise InputError(f"boxed_run takes a list of tensors, got {type(inputs).__name__}")
        return await self._with_timeout(self._submit(inputs, boxed=True), timeout)

    @staticmethod
    async def _with_timeout(coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        if timeout is None:
            return await coro
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
            leaves = [x for x in leaves if isinstance(x, torch.Tensor)]
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

    async def _mutate(self, fn: Callable[[], T], *, exclusive: bool = False) -> T:
        """Run a blocking constant operation in a thread, under the mutation lock; `exclusive`
        also holds off runs (for operations the native container does not synchronize)."""
        self._check_open()

        def call() -> T:
            if self._dispatcher.stopped:
                raise ClosedError("the model is closed")
            if not exclusive:
                return fn()
            with self._dispatcher.exclusive():
                return fn()

        async with self._lock:
            return await _in_thread(call)

    async def extract_constants(self, *, inactive: bool = False, by_fqn: bool = False
                                ) -> dict[str, torch.Tensor]:
        """Copies of the active (or inactive) buffer's constants, by internal name (or FQN)."""
        return await self._mutate(
            lambda: self._container.buffers.extract_constants(inactive=inactive, by_fqn=by_fqn)
        )

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
            lambda: self._container.buffers.update_constants(
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
        await self._mutate(lambda: self._container.buffers.fold_constants(inactive=inactive))

    async def swap_constants(self) -> None:
        """Make the inactive buffer active; runs that started before finish on the old one."""
        await self._mutate(self._container.buffers.swap_constants)

    async def free_inactive_constants(self) -> None:
        """Release the inactive buffer's memory (a later swap needs a new update first).
        `UnsupportedOperation` on a model with runtime constant folding whose inactive buffer
        holds folded constants: torch's container would crash on its next update."""
        await self._mutate(self._container.buffers.free_inactive_constants)

    async def load_constants_from_blob(self, path: str | os.PathLike[str]) -> None:
        """Load the active buffer from a weights blob file (`*_weights.blob` format)."""
        data = await anyio.Path(path).read_bytes()
        await self._mutate(lambda: self._container.buffers.load_constants_from_blob(data), exclusive=True)

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
        async with self._lock:
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
        return mapping

    # --- closing -----------------------------------------------------------------------------

    async def aclose(self, *, cancel_queued: bool = False) -> None:
        """Stop admission, finish (or with `cancel_queued`, fail) queued requests, join the
        workers, delete the native container. Idempotent."""
        if self._closed and self._dispatcher.stopped:
            return
        self._closed = True
        self._dispatcher.shutdown(cancel_queued=cancel_queued)
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._dispatcher.join)

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
        self._dispatcher.shutdown()  # the last worker to exit deletes the container

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.workers} workers"
        return f"<AsyncModel {self.files.name!r} on {self.device}, {state}>"


class ModelLoader(Coroutine[Any, Any, AsyncModel]):
    """What `load` returns: `await` it for the model, or `async with` it to close on exit. It is
    a coroutine too, so `asyncio.run(aioti.load(...))` and task factories take it."""

    def __init__(self, opener: Callable[[], Coroutine[Any, Any, AsyncModel]]) -> None:
        self._opener = opener
        self._coro: Coroutine[Any, Any, AsyncModel] | None = None
        self._model: AsyncModel | None = None

    def _started(self) -> Coroutine[Any, Any, AsyncModel]:
        if self._coro is None:
            self._coro = self._opener()
        return self._coro

    def __await__(self) -> Generator[Any, None, AsyncModel]:
        return self._started().__await__()

    def send(self, value: Any) -> Any:
        return self._started().send(value)

    def throw(self, *args: Any) -> Any:
        return self._started().throw(*args)

    def close(self) -> None:
        if self._coro is not None:
            self._coro.close()

    async def __aenter__(self) -> AsyncModel:
        self._model = await self._opener()
        return self._model

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._model is not None:
            await self._model.aclose()


def load(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    model_name: str | None = None,
    workers: int | None = None,
    max_queue: int = 1024,
    on_full: Literal["wait", "raise"] = "wait",
    check_inputs: bool = True,
    move_inputs: bool = False,
    batching: Batching | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
) -> ModelLoader:
    """Load a `.pt2` package (or a bare model `.so`) for async use.

    `device` picks the backend from the registry; `workers` the number of worker threads (one
    execution stream each; default from the backend: 1 on CPU, 4 on CUDA); `max_queue` bounds
    queued requests, and `on_full` says whether callers then wait or get `QueueFullError`;
    `check_inputs=False` skips the per-input checks (counts are always checked);
    `move_inputs=True` copies inputs to the model's device; `batching` takes an
    `aioti.Batching` to merge concurrent requests; `threads` fixes how many native (OpenMP)
    threads a run uses (default from the backend: on CPU, every core for a run alone, the cores
    shared among busy workers, one for small models). All blocking work runs off the event loop,
    except the batches of `Batching(on_loop=True)`, which run on it by request.
    """
    if on_full not in ("wait", "raise"):
        raise ValueError(f"on_full must be 'wait' or 'raise', got {on_full!r}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")

    async def opener() -> AsyncModel:
        backend = await resolve_backend(device)
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        n = workers or backend.default_workers()
        num_models = n if workers is not None else max(n, backend.max_auto_workers)
        made: list[Any] = []
        team = ThreadTeams(threads, threads) if threads is not None else None

        def blocking() -> None:
            nonlocal n, team
            files = open_model(path, model_name, cache_dir=cache_dir)
            made.append(files)
            made.append(open_container(files, device=str(backend.device), num_models=num_models,
                                       check_inputs=check_inputs))
            weights = sum(c.nbytes for c in made[1].constants)
            if workers is None and num_models > n:
                n = backend.auto_workers(weights) or n
            if team is None and (sizes := backend.worker_threads(weights, n)) is not None:
                team = ThreadTeams(*sizes)
            if batching is not None:
                if batching.on_loop and backend.device.type != "cpu":
                    raise InputError(
                        "on-loop batching runs batches on the event loop's thread, which suits "
                        f"CPU models only; this model is on {backend.device}")
                c = made[1]
                reason = probe_batch_dim(c.run_tensors, c.signature, backend.device, batching.dim)
                if reason:
                    raise InputError(f"this model cannot be batched: {reason}")

        try:
            await anyio.to_thread.run_sync(blocking)
            return AsyncModel(made[0], made[1], backend, workers=n, max_queue=max_queue,
                              on_full=on_full, move_inputs=move_inputs, batching=batching,
                              threads=team)
        except BaseException:
            if len(made) == 2:
                made[1].delete()
            if made:
                discard(made[0])
            raise

    return ModelLoader(opener)
