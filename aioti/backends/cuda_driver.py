"""The CUDA driver's event, stream, copy and graph calls that a CUDA worker makes per batch (or
per replayed request), GIL held; and those that find a captured graph's copy nodes.

A worker records an event after each batch, polls it, and makes its stream wait on callers'
streams. torch's `Event.record` and `Event.wait` release the GIL around their driver call, and
taking it back is a wait behind the event loop's thread whenever that thread took it meanwhile
(benchmarks/README.md has the measurement). These calls return in microseconds, so they are
made through `ctypes.PyDLL`, which keeps the GIL; only `synchronize`, which blocks until the
GPU is done, releases it.

Runtime and driver handles are interchangeable (a `cudaStream_t` is a `CUstream`, a
`cudaEvent_t` a `CUevent`): torch's streams are used as they are, and handle 0 is the legacy
default stream of the calling thread's current context (a worker's device).
"""

from __future__ import annotations

import ctypes
import functools
import threading
from ctypes import byref, c_char_p, c_int, c_size_t, c_uint, c_uint64, c_void_p

from ..errors import BackendError

__all__ = ["CopyParams", "Driver", "driver"]

_NOT_READY = 600  # CUDA_ERROR_NOT_READY
_DISABLE_TIMING = 0x2  # CU_EVENT_DISABLE_TIMING: recording one is then cheaper
_NON_BLOCKING = 0x1  # CU_STREAM_NON_BLOCKING: no implicit order with the legacy stream
_MEMCPY_NODE = 1  # CU_GRAPH_NODE_TYPE_MEMCPY
_DEVICE_MEMORY = 2  # CU_MEMORYTYPE_DEVICE


class CopyParams(ctypes.Structure):
    """The driver's CUDA_MEMCPY3D: a copy node's parameters (runmany.c's `aioti_memcpy3d`)."""

    _fields_ = [("srcXInBytes", c_size_t), ("srcY", c_size_t), ("srcZ", c_size_t),
                ("srcLOD", c_size_t), ("srcMemoryType", c_uint), ("srcHost", c_void_p),
                ("srcDevice", c_uint64), ("srcArray", c_void_p), ("reserved0", c_void_p),
                ("srcPitch", c_size_t), ("srcHeight", c_size_t),
                ("dstXInBytes", c_size_t), ("dstY", c_size_t), ("dstZ", c_size_t),
                ("dstLOD", c_size_t), ("dstMemoryType", c_uint), ("dstHost", c_void_p),
                ("dstDevice", c_uint64), ("dstArray", c_void_p), ("reserved1", c_void_p),
                ("dstPitch", c_size_t), ("dstHeight", c_size_t),
                ("WidthInBytes", c_size_t), ("Height", c_size_t), ("Depth", c_size_t)]


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
        self._copy = held.cuMemcpyDtoDAsync_v2
        self._copy.argtypes = [c_void_p, c_void_p, ctypes.c_size_t, c_void_p]
        self._copy.restype = c_int
        self._launch = held.cuGraphLaunch
        self._launch.argtypes = [c_void_p, c_void_p]
        self._launch.restype = c_int
        self._set_copy = held.cuGraphExecMemcpyNodeSetParams
        self._set_copy.argtypes = [c_void_p, c_void_p, ctypes.POINTER(CopyParams), c_void_p]
        self._nodes = held.cuGraphGetNodes
        self._nodes.argtypes = [c_void_p, ctypes.POINTER(c_void_p), ctypes.POINTER(c_size_t)]
        self._node_type = held.cuGraphNodeGetType
        self._node_type.argtypes = [c_void_p, ctypes.POINTER(c_int)]
        self._copy_params = held.cuGraphMemcpyNodeGetParams
        self._copy_params.argtypes = [c_void_p, ctypes.POINTER(CopyParams)]
        for fn in (self._set_copy, self._nodes, self._node_type, self._copy_params):
            fn.restype = c_int
        self._stream_create = held.cuStreamCreate
        self._stream_create.argtypes = [ctypes.POINTER(c_void_p), c_uint]
        self._stream_create.restype = c_int
        self._ctx_get = held.cuCtxGetCurrent
        self._ctx_get.argtypes = [ctypes.POINTER(c_void_p)]
        self._device_get = held.cuDeviceGet
        self._device_get.argtypes = [ctypes.POINTER(c_int), c_int]
        self._retain = held.cuDevicePrimaryCtxRetain
        self._retain.argtypes = [ctypes.POINTER(c_void_p), c_int]
        self._ctx_set = held.cuCtxSetCurrent
        self._ctx_set.argtypes = [c_void_p]
        for fn in (self._ctx_get, self._device_get, self._retain, self._ctx_set):
            fn.restype = c_int
        self._bound = threading.local()
        self._error_name = held.cuGetErrorName
        self._error_name.argtypes = [c_int, ctypes.POINTER(c_char_p)]
        self._error_name.restype = c_int

    def _check(self, code: int, what: str) -> None:
        if code:
            name = c_char_p()
            self._error_name(code, byref(name))
            label = name.value.decode() if name.value else "unknown error"
            raise BackendError(f"CUDA {what} failed: {label} (code {code})")

    def bind(self, index: int) -> None:
        """Make device `index`'s primary context the calling thread's current one if the thread
        has none yet (checked once per thread). The CUDA runtime does it at a thread's first
        runtime call, and torch skips that call where the thread's device is `index` already
        (device 0, in a thread that never used CUDA); the driver's calls then fail there
        (CUDA_ERROR_INVALID_CONTEXT). Call it with `index` the thread's current device."""
        if getattr(self._bound, "done", False):
            return
        current = c_void_p()
        self._check(self._ctx_get(byref(current)), "cuCtxGetCurrent")
        if not current.value:
            self._check(self._ctx_set(self.primary_context(index)), "cuCtxSetCurrent")
        self._bound.done = True

    def create_stream(self) -> int:
        """A new non-blocking stream of the calling thread's current context (device), never
        destroyed: one that nothing else uses, for as long as the process lives."""
        stream = c_void_p()
        self._check(self._stream_create(byref(stream), _NON_BLOCKING), "cuStreamCreate")
        return stream.value or 0

    @property
    def addresses(self) -> tuple[int, int]:
        """The addresses of cuGraphExecMemcpyNodeSetParams and cuGraphLaunch, for native
        callers (runmany.c's `aioti_replay_many`)."""
        return (ctypes.cast(self._set_copy, c_void_p).value or 0,
                ctypes.cast(self._launch, c_void_p).value or 0)

    def primary_context(self, index: int) -> int:
        """Device `index`'s primary context (the one torch uses), retained for the process."""
        device, context = c_int(), c_void_p()
        self._check(self._device_get(byref(device), index), "cuDeviceGet")
        self._check(self._retain(byref(context), device), "cuDevicePrimaryCtxRetain")
        return context.value or 0

    def copy_nodes(self, graph: int) -> list[tuple[int, int, int, int]]:
        """The 1-D device-to-device copy nodes of a graph (`cudaGraph_t`): (node, dst, src,
        nbytes) each."""
        count = c_size_t(0)
        self._check(self._nodes(graph, None, byref(count)), "cuGraphGetNodes")
        nodes = (c_void_p * count.value)()
        self._check(self._nodes(graph, nodes, byref(count)), "cuGraphGetNodes")
        found = []
        for node in nodes[:count.value]:
            kind, params = c_int(), CopyParams()
            self._check(self._node_type(node, byref(kind)), "cuGraphNodeGetType")
            if kind.value != _MEMCPY_NODE:
                continue
            self._check(self._copy_params(node, byref(params)), "cuGraphMemcpyNodeGetParams")
            if (params.srcMemoryType == params.dstMemoryType == _DEVICE_MEMORY
                    and params.Height == params.Depth == 1):
                found.append((node or 0, params.dstDevice, params.srcDevice,
                              params.WidthInBytes))
        return found

    def set_copy(self, graph_exec: int, node: int, dst: int, src: int, nbytes: int,
                 context: int) -> None:
        """Set copy node `node` of `graph_exec` (a node of the graph it was instantiated from)
        to copy `nbytes` from device address `src` to `dst` at its next launches."""
        params = CopyParams(srcMemoryType=_DEVICE_MEMORY, srcDevice=src,
                            dstMemoryType=_DEVICE_MEMORY, dstDevice=dst, WidthInBytes=nbytes,
                            Height=1, Depth=1)
        self._check(self._set_copy(graph_exec, node, byref(params), context),
                    "cuGraphExecMemcpyNodeSetParams")

    def describe(self, code: int) -> str:
        """The driver's name for an error code."""
        name = c_char_p()
        self._error_name(code, byref(name))
        return name.value.decode() if name.value else f"unknown error {code}"

    def copy(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        """Queue a copy of `nbytes` from device address `src` to `dst` on `stream`."""
        if nbytes:
            self._check(self._copy(dst, src, nbytes, stream), "cuMemcpyDtoDAsync")

    def launch_graph(self, graph_exec: int, stream: int) -> None:
        """Queue an instantiated CUDA graph (`cudaGraphExec_t`) on `stream`."""
        self._check(self._launch(graph_exec, stream), "cuGraphLaunch")

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
