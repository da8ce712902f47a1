"""Every exception aioti raises on purpose. All derive from `AiotiError`."""

from __future__ import annotations

__all__ = [
    "AiotiError",
    "BackendError",
    "ClosedError",
    "InputError",
    "ModelLoadError",
    "ModelRunError",
    "QueueFullError",
    "UnsupportedOperation",
]


class AiotiError(Exception):
    """Base class of aioti's errors."""


class ModelLoadError(AiotiError):
    """A package or model library could not be opened: the message says which file and why."""


class ModelRunError(AiotiError):
    """The model library reported a failure (a run, a constant operation, container creation)."""


class InputError(AiotiError, ValueError):
    """Inputs (or constants) that do not fit the model: names the input, what was expected and given."""


class UnsupportedOperation(AiotiError):
    """The model library cannot do the operation: it lacks the native function the operation
    needs (older torch builds), or doing it would crash the library (a known torch bug)."""


class ClosedError(AiotiError):
    """The model was closed before (or while) the request could run."""


class QueueFullError(AiotiError):
    """The request queue is full and the model was asked to reject rather than wait."""


class BackendError(AiotiError):
    """A device backend is unknown, unavailable, or failed to initialize."""
