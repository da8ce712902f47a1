"""The native run loop (`runmany.c`): several runs of one model in one GIL-free call.

A ctypes call releases the GIL and takes it back when it returns; with several worker threads
and an event loop in one process, taking it back is a wait behind the other threads (on an
H200 host, four CUDA workers spent most of their time there). Running a worker's batch of
requests in one call pays that once per batch.

The helper is plain C, compiled on first use with the system's C compiler (`$CC`, else `cc`)
into aioti's cache (`native.build`) and shared by every later process. Without a compiler, or
with `AIOTI_NATIVE=0`, `runner()` is None and callers fall back to one ctypes call per run;
`status()` says which and why.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
from ctypes import c_int32, c_size_t, c_void_p
from pathlib import Path
from typing import Any

from . import native

__all__ = ["replayer", "runner", "status"]

_SOURCE = Path(__file__).with_name("runmany.c")
_reason = "not built yet"


def status() -> str:
    """'native' when the helper is loaded, else why not (runs then go one ctypes call each)."""
    return "native" if runner() is not None else _reason


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _reason
    if os.environ.get("AIOTI_NATIVE", "1") == "0":
        _reason = "disabled by AIOTI_NATIVE=0"
        return None
    try:
        return ctypes.CDLL(str(native.build(_SOURCE, "c")))
    except (OSError, subprocess.SubprocessError) as exc:
        _reason = f"the native helper could not be built: {exc}"
        return None


@functools.cache
def replayer() -> Any:
    """`aioti_replay_many` (CUDA graph replays: copy nodes set and graphs launched through
    driver function pointers, GIL released) as a ctypes function, or None (`status()` says
    why)."""
    lib = _library()
    if lib is None:
        return None
    fn = lib.aioti_replay_many
    fn.argtypes = [c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p, c_void_p]
    fn.restype = c_int32
    return fn


@functools.cache
def runner() -> Any:
    """`aioti_run_many` as a ctypes function, or None where it cannot be built or is disabled."""
    lib = _library()
    if lib is None:
        return None
    fn = lib.aioti_run_many
    fn.argtypes = [c_void_p, c_void_p, c_void_p, c_size_t, c_void_p, c_size_t, c_size_t,
                   c_void_p, c_void_p, c_void_p]
    fn.restype = c_int32
    return fn
