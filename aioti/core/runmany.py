"""The native run loop (`runmany.c`): several runs of one model in one GIL-free call.

A ctypes call releases the GIL and takes it back when it returns; with several worker threads
and an event loop in one process, taking it back is a wait behind the other threads (on an
H200 host, four CUDA workers spent most of their time there). Running a worker's batch of
requests in one call pays that once per batch.

The helper is plain C, compiled on first use with the system's C compiler (`$CC`, else `cc`)
into aioti's cache (`<cache>/native/`, keyed by the source and the compiler) and shared by every
later process. Without a compiler, or with `AIOTI_NATIVE=0`, `runner()` is None and callers
fall back to one ctypes call per run; `status()` says which and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from ctypes import c_int32, c_size_t, c_void_p
from pathlib import Path
from typing import Any

from .package import default_cache_dir

__all__ = ["runner", "status"]

_SOURCE = Path(__file__).with_name("runmany.c")
_reason = "not built yet"


def status() -> str:
    """'native' when the helper is loaded, else why not (runs then go one ctypes call each)."""
    return "native" if runner() is not None else _reason


@functools.cache
def runner() -> Any:
    """`aioti_run_many` as a ctypes function, or None where it cannot be built or is disabled."""
    global _reason
    if os.environ.get("AIOTI_NATIVE", "1") == "0":
        _reason = "disabled by AIOTI_NATIVE=0"
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as exc:
        _reason = f"the native helper could not be built: {exc}"
        return None
    fn = lib.aioti_run_many
    fn.argtypes = [c_void_p, c_void_p, c_void_p, c_size_t, c_void_p, c_size_t, c_size_t,
                   c_void_p, c_void_p]
    fn.restype = c_int32
    return fn


def _build() -> Path:
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise OSError(f"no C compiler ({cc!r} is not on PATH)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + version.encode() + platform.machine().encode()).hexdigest()
    out = default_cache_dir() / "native" / f"runmany-{key[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(built), str(_SOURCE)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise OSError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        os.replace(built, out)  # atomic: concurrent builders each install a whole file
    return out
