"""The CUDA driver's event and stream calls that a CUDA worker makes per batch, GIL held.

A worker records an event after each batch, polls it, and makes its stream wait on callers'
streams. torch's `Event.record` and `Event.wait` release the GIL around their driver call, and
taking it back is a wait behind the event loop's thread whenever that thread took it meanwhile
(benchmarks/README.md has the measurement). These calls return in microseconds, so they are made through `ctypes.PyDLL`,
which keeps the GIL; only `synchronize`, which blocks until the GPU is done, releases it.

Runtime and driver handles are interchangeable (a `cudaStream_t` is a `CUstream`, a
`cudaEvent_t` a `CUevent`): torch's streams are used as they are, and handle 0 is the legacy
default stream of the calling thread's current context (a worker's device).
"""

from __future__ import annotations

import ctypes
import functools
from ctypes import byref, c_char_p, c_int, c_uint, c_void_p

from ..errors import BackendError

__all__ = ["Driver", "driver"]

_NOT_READY = 600  # CUDA_ERROR_NOT_READY
_DISABLE_TIMING = 0x2  # CU_EVENT_DISABLE_TIMING: recording one is then cheaper


class Driver:
    """libcuda's event calls, each raising `BackendError` on failure."""

    def __init__(self, name: str = "libcuda.so.1") -> None:
        held = ctypes.PyDLL(name)  # the library torch loaded: these calls keep the GIL
        free = ctypes.CDLL(name)  # ... and this one releases it while it blocks
        self._create = held.cuEventCreate
        self._create.argtypes = [ctypes.POINTER(c_void_p), c_uint]
        self._destroy = held.cuEventDestroy_v2
        self._record = held.cuEventRecord
        self._wait = held.cuStreamWaitEvent
        self._wait.argtypes = [c_void_p, c_void_p, c_uint]
        self._query = held.cuEventQuery
        self._stream_query = held.cuStreamQuery
        self._sync = free.cuEventSynchronize
        for fn in (self._destroy, self._query, self._stream_query, self._sync):
            fn.argtypes = [c_void_p]
        self._record.argtypes = [c_void_p, c_void_p]
        for fn in (self._create, self._destroy, self._record, self._wait, self._query,
                   self._stream_query, self._sync):
            fn.restype = c_int
        self._error_name = held.cuGetErrorName
        self._error_name.argtypes = [c_int, ctypes.POINTER(c_char_p)]
        self._error_name.restype = c_int

    def _check(self, code: int, what: str) -> None:
        if code:
            name = c_char_p()
            self._error_name(code, byref(name))
            label = name.value.decode() if name.value else "unknown error"
            raise BackendError(f"CUDA {what} failed: {label} (code {code})")

    def create_event(self) -> int:
        """A new event without timing, on the calling thread's current context."""
        event = c_void_p()
        self._check(self._create(byref(event), _DISABLE_TIMING), "cuEventCreate")
        return event.value  # type: ignore[return-value]

    def destroy_event(self, event: int) -> None:
        self._check(self._destroy(event), "cuEventDestroy")

    def record(self, event: int, stream: int) -> None:
        """Mark the point of `stream` that everything queued on it so far reaches."""
        self._check(self._record(event, stream), "cuEventRecord")

    def stream_wait(self, stream: int, event: int) -> None:
        """Make `stream`'s later work wait until `event` is reached (on the GPU: no blocking)."""
        self._check(self._wait(stream, event, 0), "cuStreamWaitEvent")

    def query(self, event: int) -> bool:
        """Whether `event` has been reached (or was never recorded)."""
        return self._done(self._query(event), "cuEventQuery")

    def idle(self, stream: int) -> bool:
        """Whether everything queued on `stream` so far has completed."""
        return self._done(self._stream_query(stream), "cuStreamQuery")

    def _done(self, code: int, what: str) -> bool:
        if code == _NOT_READY:
            return False
        self._check(code, what)
        return True

    def synchronize(self, event: int) -> None:
        """Block (GIL released) until `event` is reached."""
        self._check(self._sync(event), "cuEventSynchronize")


@functools.cache
def driver(name: str = "libcuda.so.1") -> Driver:
    """The process's driver binding (libcuda is loaded already wherever torch runs CUDA)."""
    try:
        return Driver(name)
    except (OSError, AttributeError) as exc:
        raise BackendError(f"the CUDA driver library could not be bound: {exc}") from exc
