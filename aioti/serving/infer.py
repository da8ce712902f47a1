"""The infer endpoint (`POST /v2/models/{name}[/versions/{v}]/infer`) as a plain ASGI app.

It is the one endpoint on every request's path, so it skips what the others use: Starlette's
request and response objects and a task group per request. It reads the body off `receive`
(refused past `max_body_bytes` as it arrives), runs the model, and sends the response in two
messages. While the model runs, a detached watcher task waits on `receive` for the client to
hang up and then cancels the run (still queued, it never runs): a plain task of the running
loop (an asyncio task; a trio system task), not a task group's, whose start and cancellation
cost more than the rest of the endpoint's work for a request. The watcher is cancelled when
the run ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Protocol

import anyio
import torch
from starlette.responses import JSONResponse, Response

from ..errors import AiotiError, ClosedError, InputError, QueueFullError
from ..loops import current_loop
from .metrics import Metrics
from .protocol import HEADER_LENGTH, BadRequest, decode_request, encode_response

__all__ = ["VERSION", "Infer", "NotFound", "check_version", "error_response", "infer_target",
           "run_unless_disconnected"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: the version every served model reports
VERSION = "1"
_HEADER_LENGTH = HEADER_LENGTH.encode()
_JSON = [(b"content-type", b"application/json")]
_BINARY = [(b"content-type", b"application/octet-stream")]


class NotFound(AiotiError):
    def __init__(self, name: str, version: str | None = None) -> None:
        super().__init__(
            f"unknown model {name!r} (not in the repository, or not loaded)" if version is None
            else f"model {name!r} has no version {version!r} (it serves version {VERSION!r})")


def check_version(name: str, version: str | None) -> None:
    """`NotFound` for a version of a model's path other than the one served (None: none named)."""
    if version is not None and version != VERSION:
        raise NotFound(name, version)


class Served(Protocol):
    """What the endpoint needs of a served model: the model (None: not loaded), and its input
    and output names."""

    model: Any
    inputs: list[str]
    outputs: list[str]


def infer_target(scope: Scope) -> str | None:
    """The model name of an infer request's path (as routed: below the scope's `root_path`), or
    None if the path is not an infer path."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] == "/":
        path = path[len(root):]
    parts = path.split("/")
    if parts[-1:] != ["infer"] or parts[:3] != ["", "v2", "models"]:
        return None
    if len(parts) == 5 or len(parts) == 7 and parts[4] == "versions" and parts[5] == VERSION:
        return parts[3] or None
    return None


class Models(Protocol):
    """The served models by name (the app's `ModelRepository`): a live view, loads and unloads
    show."""

    @property
    def entries(self) -> Mapping[str, Served]: ...

    def get(self, name: str) -> Served:
        """The loaded model `name`; `NotFound` if it is unknown or not loaded."""
        ...


class Infer:
    """`POST .../infer` over the served models."""

    def __init__(self, models: Models, metrics: Metrics, max_body_bytes: int) -> None:
        self._models = models
        self._metrics = metrics
        self._limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name: str = scope["path_params"]["name"]
        t0 = time.perf_counter()
        outcome = "error"
        try:
            check_version(name, scope["path_params"].get("version"))
            self._models.get(name)  # 404 before reading the body
            body, header = await self._read(scope, receive)
            # The model served now: the body may have taken a while to arrive, and the model
            # been replaced (the new one runs it) or unloaded (404) meanwhile.
            entry = self._models.get(name)
            model, names = entry.model, entry.outputs
            decoded = decode_request(body, header, entry.inputs)
            del body
            outputs = await run_unless_disconnected(model, decoded.inputs, receive)
            if outputs is None:
                outcome = "cancelled"
                return await Response(status_code=499)(scope, receive, send)
            payload, head = encode_response(name, VERSION, decoded, names, outputs)
            headers = _JSON if head is None else [*_BINARY, (_HEADER_LENGTH, b"%d" % head)]
            outcome = "ok"
            await send({"type": "http.response.start", "status": 200,
                        "headers": [*headers, (b"content-length", b"%d" % len(payload))]})
            await send({"type": "http.response.body", "body": payload})
        except _Disconnected:
            outcome = "cancelled"
        except NotFound as exc:
            outcome = "not_found"
            await error_response(404, str(exc))(scope, receive, send)
        except _TooLarge as exc:
            outcome = "bad_request"
            await error_response(413, str(exc))(scope, receive, send)
        except InputError as exc:
            outcome = "bad_request"
            await error_response(400, str(exc))(scope, receive, send)
        except QueueFullError as exc:
            outcome = "queue_full"
            await error_response(503, str(exc), **{"Retry-After": "1"})(scope, receive, send)
        except ClosedError as exc:
            outcome = "unavailable"
            await error_response(503, f"model {name!r} is not serving: {exc}",
                                 **{"Retry-After": "1"})(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - a failed run answers 500, the server goes on
            await error_response(500, f"{type(exc).__name__}: {exc}")(scope, receive, send)
        finally:
            if name in self._models.entries:  # not a label per name a client makes up
                self._metrics.request(name, outcome, time.perf_counter() - t0)

    async def _read(self, scope: Scope, receive: Receive) -> tuple[bytes, int | None]:
        """The body (refused past the limit as it arrives, not after) and the binary data
        extension's JSON header length, if given."""
        declared = header = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                declared = value
            elif key == _HEADER_LENGTH:
                header = value
        if header is not None and not header.isdigit():
            raise BadRequest(f"{HEADER_LENGTH} must be a byte count, "
                             f"got {header.decode('latin-1')!r}")
        limit = self._limit
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _TooLarge(int(declared), limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _TooLarge(size, limit)
            if not message.get("more_body", False):
                body = chunk if not chunks else b"".join([*chunks, chunk])
                return body, None if header is None else int(header)
            chunks.append(chunk)


async def run_unless_disconnected(model: Any, inputs: list[torch.Tensor], receive: Receive
                                  ) -> list[torch.Tensor] | None:
    """`model.run(inputs)`, or None if the client hangs up first (the run cancelled: still
    queued, it never runs). A watcher task waits on `receive` meanwhile (on asyncio it cancels
    the calling task itself, cheaper than a cancel scope) and is cancelled when the run ends:
    a server need not answer `receive` after the response (Ray Serve's replicas stop fetching
    messages then), and a watcher left waiting would keep its request's state."""
    if current_loop().kind == "asyncio":
        return await _run_asyncio(model, inputs, receive)
    import trio

    done = False
    scope, watching = anyio.CancelScope(), trio.CancelScope()

    async def watch() -> None:
        with watching:
            if await _disconnected(receive) and not done:
                scope.cancel()

    trio.lowlevel.spawn_system_task(watch)
    try:
        with scope:
            return await model.run(inputs)  # type: ignore[no-any-return]
    finally:
        done = True
        watching.cancel()
    return None


async def _run_asyncio(model: Any, inputs: list[torch.Tensor], receive: Receive
                       ) -> list[torch.Tensor] | None:
    task = asyncio.current_task()
    assert task is not None
    done = hung_up = False

    async def watch() -> None:
        nonlocal hung_up
        if await _disconnected(receive) and not done:
            hung_up = True
            task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await model.run(inputs)  # type: ignore[no-any-return]
    except asyncio.CancelledError:
        # ours alone (3.11+: no other cancellation pending): the client left; else go on
        if hung_up and getattr(task, "uncancel", lambda: 0)() == 0:
            return None
        raise
    finally:
        done = True
        watcher.cancel()


async def _disconnected(receive: Receive) -> bool:
    """Wait for `http.disconnect`; False if `receive` failed instead (a server that fails it
    has dropped the client anyway)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001
        return False
    return True


def error_response(status: int, message: str, **headers: str) -> JSONResponse:
    """The protocol's error body, `{"error": message}`."""
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class _Disconnected(Exception):
    """The client left before its request's body arrived."""


class _TooLarge(Exception):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the request body has {size} bytes or more; this server takes at most "
                         f"{limit} (max_body_bytes)")
