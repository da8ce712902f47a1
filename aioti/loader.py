"""`aioti.load(...)`: open a package on one device or several, off the event loop, and hand
back the model (`AsyncModel`, or `ReplicaPool` for several devices) - awaited, or as an async
context manager that closes it.

The blocking work (extraction, dlopen, container creation, the batching probe) runs in a
thread. A load that fails closes what it made and removes what it extracted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio
import torch

from .backends.base import Backend
from .backends.registry import resolve_backend
from .core.container import Container, open_container
from .core.package import ModelFiles, discard, open_model
from .core.threads import ThreadTeams, team_of_one
from .core.weights import read_state_dict
from .errors import InputError, check_count
from .loops.parking import ParkingLot
from .model import AsyncModel
from .pool import ReplicaPool
from .replica import Replica, devices
from .runtime.batching import Batching, probe_batch_dim
from .runtime.graphs import CudaGraphs

__all__ = ["ModelLoader", "check_options", "load"]


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
    path: str | os.PathLike[str] | bytes | Any,
    *,
    device: str | torch.device | Sequence[str | torch.device] = "cpu",
    model_name: str | None = None,
    workers: int | None = None,
    max_queue: int = 1024,
    on_full: Literal["wait", "raise"] = "wait",
    check_inputs: bool = True,
    move_inputs: bool = False,
    batching: Batching | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    weights: Mapping[str, torch.Tensor] | str | os.PathLike[str] | None = None,
    cuda_graphs: CudaGraphs | None = None,
) -> ModelLoader:
    """Load a `.pt2` package (or a bare model `.so`) for async use: a path, or the package's
    bytes or a binary file object (as torch's loader takes), cached under their hash.

    `device` picks the backend from the registry; a list of devices (or `"cuda:*"`, every
    visible GPU) loads a replica on each, behind one model (`aioti.ReplicaPool`); `workers`
    the number of worker threads per replica (one execution stream each; default from the
    backend: 1 on CPU, 3 on CUDA, divided by twice the replicas in a pool, at least 1);
    `max_queue` bounds each replica's queued requests, and
    `on_full` says whether callers then wait or get `QueueFullError`; `check_inputs=False`
    skips the per-input checks (counts are always checked); `move_inputs=True` copies inputs to
    the model's device; `batching` takes an `aioti.Batching` to merge concurrent requests;
    `threads` fixes how many native (OpenMP) threads a run uses (default from the backend: on
    CPU, every core for a run alone, the cores shared among busy workers and among replicas on
    the CPU, one for small models). All blocking work runs off the event loop, except the
    batches of `Batching(on_loop=True)`, which run on it by request.

    `weights` (a state dict by constant name or FQN, or a `.safetensors` or `torch.save` file)
    updates the model's constants before it serves: how a package compiled without weights
    (`package_constants_in_so=False` and none stored) gets them, every constant then required;
    for other packages, the constants named are replaced. Packages that store their weights
    outside the library (a blob, `torch.save`d tensors) are loaded with them; C++-only packages
    are compiled once (on the "aioti" logger: what is built, where, how long); operators without
    a C shim run through aioti's proxy executor, from Python.

    `cuda_graphs` takes an `aioti.CudaGraphs`: on a CUDA device, each worker captures the run
    at the batch sizes listed, at load, and replays them (docs/devices.md#cuda-graphs); one
    worker stream unless `workers` says otherwise.
    """
    check_options(workers=workers, max_queue=max_queue, on_full=on_full, batching=batching,
                  threads=threads, cuda_graphs=cuda_graphs)
    wanted = devices(device)

    async def opener() -> AsyncModel:
        backends = [await resolve_backend(d) for d in wanted]
        pool = len(backends) > 1
        files: ModelFiles | None = None
        made: list[Container] = []
        replicas: list[Replica] = []
        router_box: list[Any] = []
        room = ParkingLot() if pool else None
        # A pool keeps about half of one replica's worker threads in all: every worker takes the
        # GIL, and so does the loop (benchmarks/README.md: a CUDA pool on two GPUs with two
        # workers each kept its loop waiting for the GIL).
        share = 2 * len(backends) if pool else 1

        def fault(index: int) -> Callable[[BaseException], None]:
            return lambda exc: router_box[0].fault(index, exc) if router_box else None

        def blocking() -> None:
            nonlocal files
            # No OpenMP team of this thread's: the model's lead worker owns its team.
            with team_of_one():
                files = open_model(path, model_name, cache_dir=cache_dir)
                given = (read_state_dict(Path(weights)) if isinstance(weights, (str, os.PathLike))
                         else weights)
                for i, backend in enumerate(backends):
                    n = workers or max(1, backend.default_workers() // share)
                    if cuda_graphs is not None and workers is None:
                        # Replays cost the worker microseconds of Python each and little else:
                        # more worker streams only contend for the GIL (benchmarks/README.md).
                        n = 1
                    num_models = (n if workers is not None or cuda_graphs is not None
                                  else max(n, backend.max_auto_workers))
                    container = open_container(files, device=str(backend.device),
                                               num_models=num_models, check_inputs=check_inputs)
                    made.append(container)
                    if given is not None:
                        container.buffers.update_constants(given)
                    size = sum(c.nbytes for c in container.constants)
                    if workers is None and num_models > n:
                        n = backend.auto_workers(size) or n
                    sharing = sum(b.device == backend.device for b in backends)
                    team = _teams(backend, threads, size, n, sharing)
                    if i == 0 and batching is not None:
                        if batching.on_loop and backend.device.type != "cpu":
                            raise InputError(
                                "on-loop batching runs batches on the event loop's thread, which "
                                f"suits CPU models only; this model is on {backend.device}")
                        if not container.buffers.loaded:
                            raise container.buffers.unloaded_error()  # the probe runs the model
                        reason = probe_batch_dim(container.run_tensors, container.signature,
                                                 backend.device, batching.dim)
                        if reason:
                            raise InputError(f"this model cannot be batched: {reason}")
                    name = f"aioti-{files.name}" + (f"-{i}" if pool else "")
                    replicas.append(Replica.build(
                        i, name, container, backend, workers=n, max_queue=max_queue,
                        batching=batching, threads=team, room=room,
                        on_fault=fault(i) if pool else None, cuda_graphs=cuda_graphs))

        try:
            await anyio.to_thread.run_sync(blocking)
        except BaseException:
            for r in replicas:
                r.dispatcher.shutdown()  # its last worker deletes the container
            for c in made[len(replicas):]:
                c.delete()
            if files is not None:
                discard(files)
            raise
        assert files is not None
        if not pool:
            return AsyncModel(files, replicas, on_full=on_full, move_inputs=move_inputs)
        model = ReplicaPool(files, replicas, on_full=on_full, move_inputs=move_inputs,
                            room=room)  # type: ignore[arg-type]
        router_box.append(model.router)
        return model

    return ModelLoader(opener)


def check_options(*, workers: int | None = None, max_queue: int = 1024,
                  on_full: str = "wait", batching: Batching | None = None,
                  threads: int | None = None, cuda_graphs: CudaGraphs | None = None) -> None:
    """`load`'s checks of its options (TypeError or ValueError naming the option), made before
    anything is opened; `serving.app` and `aioti.ray.deployment` make them when called, rather
    than where their models load (at the server's start, in each Ray replica)."""
    if on_full not in ("wait", "raise"):
        raise ValueError(f"on_full must be 'wait' or 'raise', got {on_full!r}")
    if threads is not None:
        check_count("threads", threads)
    if workers is not None:
        check_count("workers", workers)
    check_count("max_queue", max_queue)
    if batching is not None and not isinstance(batching, Batching):
        raise TypeError(f"batching must be an aioti.Batching or None, got {batching!r}")
    if cuda_graphs is not None and not isinstance(cuda_graphs, CudaGraphs):
        raise TypeError(f"cuda_graphs must be an aioti.CudaGraphs or None, got {cuda_graphs!r}")


def _teams(backend: Backend, threads: int | None, weight_bytes: int, workers: int,
           sharing: int) -> ThreadTeams | None:
    """A replica's native team sizes: `threads` if given, else the backend's choice for its
    workers, divided among the `sharing` replicas on the same device."""
    if threads is not None:
        return ThreadTeams(threads, threads, threads)
    sizes = backend.worker_threads(weight_bytes, workers)
    if sizes is None:
        return None
    return ThreadTeams(*(max(1, n // sharing) for n in sizes), tune=True)
