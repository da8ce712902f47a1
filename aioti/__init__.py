"""aioti: serve PyTorch AOTInductor models from asyncio and trio.

`model = await aioti.load("model.pt2")` (or `async with aioti.load(...) as model:`), then
`await model(x)`. See the README and docs/ for the concurrency model.
"""

from .backends import Backend, backends, register_backend, resolve_backend
from .errors import (
    AiotiError,
    BackendError,
    ClosedError,
    InputError,
    ModelLoadError,
    ModelRunError,
    QueueFullError,
    UnsupportedOperation,
)
from .loader import ModelLoader, load
from .model import AsyncModel
from .pool import ReplicaPool
from .runtime.batching import Batching
from .runtime.graphs import CudaGraphs

__version__ = "0.1.0"

__all__ = [
    "AiotiError", "AsyncModel", "Backend", "BackendError", "Batching", "ClosedError", "CudaGraphs",
    "InputError", "ModelLoadError", "ModelLoader", "ModelRunError", "QueueFullError", "ReplicaPool",
    "UnsupportedOperation", "backends", "load", "register_backend", "resolve_backend",
]
