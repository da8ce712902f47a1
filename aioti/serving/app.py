"""The Open Inference Protocol (KServe v2) over HTTP, as an ASGI app: `aioti.serving.app(...)`.

Run it by itself (`aioti serve MODEL.pt2`, uvicorn) or mount it in another ASGI app (a Ray
Serve ingress). Endpoints, as the KServe v2 REST specification and Triton's extensions define
them (all bodies JSON; errors are `{"error": "..."}`):

- `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2` (server metadata);
- `GET /v2/models/{name}[/versions/{v}]` (metadata), `.../ready`, `POST .../infer`, with
  JSON tensors and Triton's binary tensor data extension (`Inference-Header-Content-Length`);
- the model repository extension: `POST /v2/repository/index`,
  `POST /v2/repository/models/{name}/load` (a new package with `{"parameters": {"path": P}}`),
  `POST /v2/repository/models/{name}/unload`: a model is loaded or replaced without a restart,
  and requests already in flight on the old one finish;
- aioti's own `POST /v2/models/{name}/weights` (`{"path": P}`: a weights file on the server),
  a hot swap that never drops a request;
- `GET /metrics` (Prometheus text).

Status codes: 400 for a bad request (the `InputError` text), 404 for an unknown model (or a
version other than "1"), 413 for a body over `max_body_bytes`, 503 with `Retry-After` when the
model's queue is full (or it is closing, or stopped serving), 500 for a failed run. A client
that disconnects cancels its request: if still queued, it never runs. Readiness follows what
the models serve (Triton's strict readiness: a model unloaded on request does not count).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import torch
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..core import check_package
from ..errors import AiotiError, ClosedError, InputError, ModelLoadError
from ..loader import check_options, load
from ..model import AsyncModel
from ..runtime.batching import Batching
from .infer import VERSION, Infer, NotFound, Scope, check_version, error_response, infer_target
from .metrics import Metrics
from .protocol import BadRequest, datatype, input_names, output_names

__all__ = ["ModelRepository", "app"]

@dataclass
class Served:
    """One model of the repository: where its package is, and the model once loaded."""

    name: str
    path: Path
    model: AsyncModel | None = None
    state: str = "UNAVAILABLE"
    reason: str = ""
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def status(self) -> tuple[str, str]:
        """(state, reason) as the repository index says them: READY while the model serves
        requests; UNAVAILABLE with why not (not loaded, unloaded, or its workers failed)."""
        if self.model is None:
            return self.state, self.reason
        if self.model.healthy:
            return "READY", ""
        return "UNAVAILABLE", self.model.stats()["fault"] or "closed"


class ModelRepository:
    """The models a server serves, by name. `load` opens (or replaces) one, `unload` closes
    it, `hot_swap` swaps its weights, one at a time; a replaced or unloaded model finishes the
    requests it has before it closes."""

    def __init__(self, packages: Mapping[str, str | os.PathLike[str] | AsyncModel], *,
                 load_options: Mapping[str, Any], metrics: Metrics,
                 log: Callable[[str], None]) -> None:
        self.entries: dict[str, Served] = {}
        #: models given loaded, installed by `load` when the app starts
        self._given: dict[str, AsyncModel] = {}
        for name, p in packages.items():
            if isinstance(p, AsyncModel):
                self._given[name] = p
                p = p.files.package or p.files.library
            self.entries[name] = Served(name, Path(p))
        self._options = dict(load_options)
        self._metrics = metrics
        self._log = log
        self._lock = anyio.Lock()

    def models(self) -> dict[str, AsyncModel]:
        return {n: e.model for n, e in self.entries.items() if e.model is not None}

    def get(self, name: str) -> Served:
        entry = self.entries.get(name)
        if entry is None or entry.model is None:
            raise NotFound(name)
        return entry

    async def load(self, name: str, path: str | os.PathLike[str] | None = None) -> None:
        async with self._lock:
            entry = self.entries.get(name)
            if entry is None:
                if path is None:
                    raise NotFound(name)
                entry = self.entries[name] = Served(name, Path(path))
            target = Path(path) if path is not None else entry.path
            given = self._given.pop(name, None) if path is None else None
            if given is None:
                self._log(f"loading {name} from {target} ...")
            try:
                model = given or await load(target, **self._options)
                names = (input_names(model.in_spec, len(model.signature.inputs)),
                         output_names(model.out_spec, len(model.output_names)))
                meta = await _metadata(name, model, *names)
            except BaseException as exc:
                if entry.model is None:
                    entry.state, entry.reason = "UNAVAILABLE", str(exc)
                if isinstance(exc, Exception):
                    self._log(f"{name}: not loaded: {exc}")
                raise
            model.observe(self._metrics.observer(name))
            old = entry.model
            entry.path, entry.model, entry.state, entry.reason = target, model, "READY", ""
            entry.inputs, entry.outputs, entry.metadata = names[0], names[1], meta
            self._log(_describe(meta))
            if old is not None:
                await old.aclose()  # its requests in flight finish first

    async def hot_swap(self, name: str, path: str) -> None:
        """Hot-swap the weights of the model `name` from a weights file, with no load or unload
        of the repository's under way (the model swapped is the one served after)."""
        async with self._lock:
            model = self.get(name).model
            assert model is not None
            await model.hot_swap(path)

    async def unload(self, name: str) -> None:
        async with self._lock:
            entry = self.entries.get(name)
            if entry is None:
                raise NotFound(name)
            model, entry.model = entry.model, None
            entry.state, entry.reason = "UNAVAILABLE", "unloaded"
        if model is not None:
            await model.aclose()

    async def aclose(self) -> None:
        for name in list(self.entries):
            await self.unload(name)


async def _metadata(name: str, model: AsyncModel, ins: list[str], outs: list[str]
                    ) -> dict[str, Any]:
    """The model's metadata: inputs from its signature (-1 for dynamic dims); outputs from two
    example runs (a dim that differs between them is dynamic)."""
    inputs = []
    for n, spec in zip(ins, model.signature.inputs):
        shape = [-1 if not isinstance(s, int) else s for s in (spec.sizes or ())]
        inputs.append({"name": n, "datatype": datatype(spec.dtype), "shape": shape})
    outputs: list[dict[str, Any]] = [{"name": n, "datatype": "UNKNOWN", "shape": []} for n in outs]
    try:
        runs = [await model.run(model.signature.example(model.device, rows=r)) for r in (2, 3)]
    except (InputError, RuntimeError, AiotiError):
        runs = []
    if runs:
        outputs = [{"name": n, "datatype": datatype(a.dtype),
                    "shape": [s if s == t else -1 for s, t in zip(a.shape, b.shape)]}
                   for n, a, b in zip(outs, *runs)]
    return {"name": name, "versions": [VERSION], "platform": "aioti_pt2",
            "inputs": inputs, "outputs": outputs}


def _describe(meta: dict[str, Any]) -> str:
    def side(items: list[dict[str, Any]]) -> str:
        return ", ".join(f"{i['name']}: {i['datatype']}{i['shape']}" for i in items)

    return f"{meta['name']} ready - inputs {side(meta['inputs'])} -> outputs {side(meta['outputs'])}"


def app(
    models: (Mapping[str, str | os.PathLike[str] | AsyncModel]
             | Sequence[str | os.PathLike[str]]),
    *,
    device: str | torch.device | Sequence[str | torch.device] = "cpu",
    batching: Batching | None = None,
    workers: int | None = None,
    max_queue: int = 1024,
    max_body_bytes: int = 64 << 20,
    log: Callable[[str], None] | None = None,
) -> Starlette:
    """The Open Inference Protocol app over `models` (name -> package path, or paths named by
    their file's stem; or name -> a loaded `AsyncModel`, which the app then serves and owns).
    Models load when the app starts (its lifespan) and close, draining their requests, when it
    stops. `device`, `batching`, `workers` and `max_queue` are
    `aioti.load`'s; a full queue answers 503. A package path that is missing or holds no model
    raises `ModelLoadError` here, as a bad option raises here."""
    check_options(workers=workers, max_queue=max_queue, batching=batching)
    packages = (dict(models) if isinstance(models, Mapping)
                else {Path(p).stem: p for p in models})
    for p in packages.values():  # a missing or unreadable package fails here, not at the start
        if not isinstance(p, AsyncModel):
            check_package(p)
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    repo_box: list[ModelRepository] = []
    metrics = Metrics(lambda: repo_box[0].models() if repo_box else {})
    repo = ModelRepository(packages, metrics=metrics, log=say, load_options={
        "device": device, "batching": batching, "workers": workers, "max_queue": max_queue,
        "on_full": "raise"})
    repo_box.append(repo)

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        for name in list(repo.entries):
            await repo.load(name)
        try:
            yield
        finally:
            say("closing: finishing the requests in flight")
            with anyio.CancelScope(shield=True):
                await repo.aclose()

    async def live(request: Request) -> Response:
        return Response(status_code=200)

    async def ready(request: Request) -> Response:
        # As Triton's strict readiness: every model serves, but for those unloaded on request.
        ok = all(e.status()[0] == "READY" or e.reason == "unloaded"
                 for e in repo.entries.values())
        return Response(status_code=200 if ok else 400)

    async def server_metadata(request: Request) -> Response:
        return JSONResponse({"name": "aioti", "version": __version__,
                             "extensions": ["binary_tensor_data", "model_repository"]})

    async def model_metadata(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            check_version(name, request.path_params.get("version"))
            entry = repo.get(name)
        except NotFound as exc:
            return error_response(404, str(exc))
        return JSONResponse(entry.metadata)

    async def model_ready(request: Request) -> Response:
        name = request.path_params["name"]
        entry = repo.entries.get(name)
        try:
            check_version(name, request.path_params.get("version"))
            if entry is None:
                raise NotFound(name)
        except NotFound as exc:
            return error_response(404, str(exc))
        return Response(status_code=200 if entry.status()[0] == "READY" else 400)

    infer = Infer(repo, metrics, max_body_bytes)

    async def repository_index(request: Request) -> Response:
        rows = []
        for e in repo.entries.values():
            state, reason = e.status()
            rows.append({"name": e.name, "version": VERSION, "state": state, "reason": reason})
        return JSONResponse(rows)

    async def repository_load(request: Request) -> Response:
        name = request.path_params["name"]
        path = None
        body = await request.body()
        if body:
            try:
                params = (await request.json()).get("parameters") or {}
            except (ValueError, AttributeError):
                return error_response(400, "the load request body must be a JSON object")
            if not isinstance(params, dict):
                return error_response(400, f"the load request's parameters must be an object, "
                                      f"got {params!r}")
            unknown = set(params) - {"path"}
            if unknown:
                return error_response(
                    400, f"unsupported load parameters {sorted(unknown)}: aioti loads a "
                    "package from the server's disk ({'path': ...})")
            path = params.get("path")
            if path is not None and not isinstance(path, str):
                return error_response(400, f"the load request's path must be a string, "
                                      f"got {path!r}")
        try:
            await repo.load(name, path)
        except NotFound as exc:
            return error_response(404, str(exc))
        except (ModelLoadError, InputError, OSError) as exc:
            return error_response(400, f"cannot load {name!r}: {exc}")
        return Response(status_code=200)

    async def repository_unload(request: Request) -> Response:
        try:
            await repo.unload(request.path_params["name"])
        except NotFound as exc:
            return error_response(404, str(exc))
        return Response(status_code=200)

    async def weights(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            repo.get(name)  # 404 before reading the body
            body = await request.json()
            path = body.get("path") if isinstance(body, dict) else None
            if not isinstance(path, str):
                raise BadRequest("the body must be {\"path\": \"<a weights file on the server>\"}")
            await repo.hot_swap(name, path)
        except NotFound as exc:
            return error_response(404, str(exc))
        except ClosedError as exc:  # unloaded meanwhile
            return error_response(503, f"model {name!r} is not serving: {exc}",
                                  **{"Retry-After": "1"})
        except (InputError, OSError, ValueError) as exc:
            metrics.hot_swaps.labels(name, "failed").inc()
            return error_response(
                400, f"hot swap of {name!r} failed, the old weights serve on: {exc}")
        metrics.hot_swaps.labels(name, "ok").inc()
        return JSONResponse({"model_name": name, "swapped": True})

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
        Route("/v2/models/{name}", model_metadata),
        Route("/v2/models/{name}/versions/{version}", model_metadata),
        Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/versions/{version}/ready", model_ready),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/weights", weights, methods=["POST"]),
        Route("/v2/repository/index", repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", repository_unload, methods=["POST"]),
        Route("/metrics", prometheus),
    ]
    server = _Server(infer, routes=routes, lifespan=lifespan)
    server.state.repository = repo
    server.state.metrics = metrics
    return server


class _Server(Starlette):
    """Starlette, with infer requests sent straight to their endpoint: past the middleware and
    the route table, which every other request goes through (and which route an infer path
    the same way)."""

    def __init__(self, infer: Infer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._infer = infer

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        name = infer_target(scope) if scope["type"] == "http" and scope["method"] == "POST" \
            else None
        if name is not None:
            scope["app"] = self
            scope["path_params"] = {**scope.get("path_params", {}), "name": name}
            await self._infer(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)
