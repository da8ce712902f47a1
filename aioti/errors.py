"""Every exception aioti raises on purpose (all derive from `AiotiError`), and the checks of
option values that raise the built-in ones."""

from __future__ import annotations

import math
import operator

__all__ = [
    "AiotiError",
    "BackendError",
    "ClosedError",
    "InputError",
    "ModelLoadError",
    "ModelRunError",
    "QueueFullError",
    "UnsupportedOperation",
    "check_count",
    "check_duration",
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


def check_count(name: str, value: object, minimum: int | None = 1) -> int:
    """`value` as an int if it is one (or an integer like numpy's; not a bool) of at least
    `minimum` (None: any); else TypeError (not an integer) or ValueError, naming the option,
    what it takes and what was given."""
    try:
        if isinstance(value, bool):
            raise TypeError
        count = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None
    if minimum is not None and count < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {count}")
    return count


def check_duration(name: str, value: object, *, positive: bool = False) -> float:
    """`value` if it is a finite real number >= 0 (> 0 with `positive`); else TypeError or
    ValueError, as `check_count`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, "
                         f"got {value}")
    return value
