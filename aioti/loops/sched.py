"""A short scheduler slice for the event loop's thread (Linux 6.12 and later).

An event loop wakes up often for a little work: a result to hand over, a timer. Where aioti's
workers (and a CPU model's native thread team) keep every core busy, a woken loop thread
waited for the running thread's whole slice: the kernel's default (about 1-3 ms) is what the
loop lag p99 measured with a mid-size CPU model at 16 and 64 concurrent callers. Since Linux
6.12 a thread may ask for a shorter slice (`sched_setattr`'s `sched_runtime` for the normal
policy): a woken thread with a shorter slice runs first, with the same share of the CPU as
before. aioti asks for `AIOTI_LOOP_SLICE_US` microseconds (100, the kernel's least, unless set;
0 leaves the thread alone) once for each loop thread it serves, keeping the thread's policy and
nice value, and with the kernel's reset-on-fork flag: threads started from the loop's thread
(aioti's workers, a thread pool) get the default slice, not this one. Elsewhere (older kernels,
other systems, a real-time policy or a negative nice value, which reset-on-fork would not pass
on) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys
import threading

__all__ = ["loop_slice_us", "shorten_slice"]

# sched_setattr / sched_getattr system call numbers
_CALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
# struct sched_attr (version 1, 56 bytes): size, policy, flags, nice, priority, runtime,
# deadline, period, util_min, util_max
_ATTR = struct.Struct("IIQiIQQQII")
_NORMAL_POLICIES = (0, 3)  # SCHED_OTHER, SCHED_BATCH
_RESET_ON_FORK = 0x01  # SCHED_FLAG_RESET_ON_FORK
_asked = threading.local()  # per live thread (a thread's ident is reused once it has exited)


def loop_slice_us() -> int:
    """The slice asked for a loop's thread, in microseconds (0: none)."""
    raw = os.environ.get("AIOTI_LOOP_SLICE_US", "100")
    try:
        return max(0, int(raw))
    except ValueError:
        return 0


def shorten_slice() -> bool:
    """On an event loop's thread: ask once for a short slice. True if it is set now."""
    if getattr(_asked, "done", False):
        return False
    _asked.done = True
    us = loop_slice_us()
    calls = _CALLS.get(platform.machine())
    if not us or calls is None or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(_ATTR.size)
        if libc.syscall(calls[1], 0, buf, _ATTR.size, 0) != 0:
            return False
        _, policy, _, nice, priority, *_rest = _ATTR.unpack(buf.raw)
        if policy not in _NORMAL_POLICIES or nice < 0:
            return False  # a thread given a priority keeps what it was given
        new = _ATTR.pack(_ATTR.size, policy, _RESET_ON_FORK, nice, priority, us * 1000, 0, 0,
                         0, 0)
        return bool(libc.syscall(calls[0], 0, ctypes.create_string_buffer(new, _ATTR.size),
                                 0) == 0)
    except (OSError, AttributeError):
        return False
