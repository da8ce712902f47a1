"""The backend registry: device type -> factory, resolved once per device, safe under concurrency.

- `register_backend(name, factory, replace=False)`: `factory(device)` returns a `Backend`, or an
  awaitable of one.
- `await resolve_backend(device)` returns the backend of a device ("cuda", "cuda:1", a
  `torch.device`), creating it on first use. Concurrent resolvers of one device, on any number of
  event loops (asyncio or trio, in any threads), share a single initialization: the first runs
  the factory, the others wait for its result. If the first is cancelled, the next waiter runs it.
- Third-party packages register through the entry-point group `aioti.backends` (name = device
  type, object = factory); they are loaded on the first resolve. A plugin that fails to load
  makes resolving *its* name raise `BackendError` naming it; other backends are unaffected.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable
from importlib.metadata import entry_points
from typing import Any, Union

import torch

from ..errors import BackendError
from ..loops.parking import ParkingLot
from .base import Backend

__all__ = ["backends", "register_backend", "resolve_backend"]

Factory = Callable[[torch.device], Union[Backend, Awaitable[Backend]]]

_lock = threading.Lock()
_factories: dict[str, Factory] = {}
_broken: dict[str, str] = {}
_instances: dict[str, Backend] = {}
_pending: dict[str, ParkingLot] = {}  # device -> resolvers waiting for its first
_plugins_loaded = False
_RETRY = object()


def register_backend(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Register `factory` for device type `name`; `replace=True` to override a registered one
    (backends already created for that type are kept by models using them, and re-created for
    new resolves)."""
    if not name or not name.isidentifier():
        raise ValueError(f"backend name must be a device type like 'cuda', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    with _lock:
        if name in _factories and not replace:
            raise BackendError(f"a backend is already registered for {name!r} (pass replace=True)")
        _factories[name] = factory
        _broken.pop(name, None)
        for key in [k for k in _instances if k.split(":")[0] == name]:
            del _instances[key]


def backends() -> list[str]:
    """Registered device types (plugins included once loaded; broken plugins excluded)."""
    _load_plugins()
    with _lock:
        return sorted(_factories)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group="aioti.backends"):
        try:
            factory = ep.load()
        except Exception as exc:  # a broken plugin must not break the others
            with _lock:
                if ep.name not in _factories:
                    _broken[ep.name] = f"plugin {ep.value!r} failed to load: {exc!r}"
            continue
        with _lock:
            _factories.setdefault(ep.name, factory)


def _key(device: str | torch.device) -> tuple[str, torch.device]:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BackendError(f"not a device: {device!r} ({exc}); registered: {backends()}") from exc
    return str(dev), dev


async def resolve_backend(device: str | torch.device) -> Backend:
    """The backend serving `device`, initialized once per device."""
    _load_plugins()
    key, dev = _key(device)
    while True:
        with _lock:
            if (backend := _instances.get(key)) is not None:
                return backend
            if dev.type in _broken:
                raise BackendError(f"backend {dev.type!r}: {_broken[dev.type]}")
            factory = _factories.get(dev.type)
            if factory is None:
                raise BackendError(
                    f"no backend for device type {dev.type!r}; registered: {sorted(_factories)}"
                )
            lot = _pending.get(key)
            if lot is None:
                _pending[key] = ParkingLot()
            else:
                ticket = lot.park()
        if lot is None:
            return await _initialize(key, dev, factory)
        result = await lot.wait(ticket)
        if result is not _RETRY:
            return result  # type: ignore[no-any-return]


async def _initialize(key: str, dev: torch.device, factory: Factory) -> Backend:
    outcome: Any = _RETRY
    error: BaseException | None = None
    try:
        made = factory(dev)
        if inspect.isawaitable(made):
            made = await made
        if not isinstance(made, Backend):
            raise BackendError(
                f"backend factory for {dev.type!r} returned {type(made).__name__}, not a Backend"
            )
        outcome = made
        return made
    except BackendError as exc:
        error = exc
        raise
    except Exception as exc:
        error = BackendError(f"backend {dev.type!r} failed to initialize {key}: {exc!r}")
        raise error from exc
    finally:
        with _lock:
            if outcome is not _RETRY:
                _instances[key] = outcome
            lot = _pending.pop(key)
        # A cancelled leader leaves outcome _RETRY: the waiters retry (one of them leads).
        lot.unpark_all(outcome if error is None else None, error)


def _register_builtins() -> None:
    from .cpu import CpuBackend
    from .cuda import CudaBackend
    from .device import SyncDeviceBackend

    _factories["cpu"] = CpuBackend
    _factories["cuda"] = CudaBackend
    # xpu and mps only where the installed torch was built with them.
    if getattr(getattr(torch, "xpu", None), "_is_compiled", lambda: False)():
        _factories["xpu"] = SyncDeviceBackend
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_built():
        _factories["mps"] = SyncDeviceBackend


_register_builtins()
