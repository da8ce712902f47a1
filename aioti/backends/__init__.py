"""Device backends and their registry."""

from .base import Backend
from .registry import backends, register_backend, resolve_backend

__all__ = ["Backend", "backends", "register_backend", "resolve_backend"]
