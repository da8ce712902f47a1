"""The loop thread's short scheduler slice (Linux 6.12+), each in a fresh thread: asked for by
the first use of aioti on a loop (asyncio and trio), with the thread's nice value kept and not
passed on to threads it starts, and not asked for with AIOTI_LOOP_SLICE_US=0."""

from __future__ import annotations

import asyncio
import ctypes
import os
import platform
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import trio

from aioti.loops import current_loop
from aioti.loops.sched import _ATTR, _CALLS, shorten_slice

_GET = _CALLS.get(platform.machine(), (None, None))[1]


def _sched() -> tuple[int, int]:
    """The calling thread's (nice, slice in ns) as sched_getattr reads them."""
    buf = ctypes.create_string_buffer(_ATTR.size)
    assert ctypes.CDLL(None).syscall(_GET, 0, buf, _ATTR.size, 0) == 0
    _, _, _, nice, _, runtime, *_ = _ATTR.unpack(buf.raw)
    return nice, runtime


def _in_thread(fn: Callable[[], Any]) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(30)
    assert out, "the thread did not finish"
    return out[0]


def _kernel_takes_slices() -> bool:
    if not sys.platform.startswith("linux") or _GET is None:
        return False
    return bool(_in_thread(lambda: (shorten_slice(), _sched()[1])[1] == 100_000))


pytestmark = pytest.mark.skipif(not _kernel_takes_slices(),
                                reason="needs Linux 6.12+ (custom slices) on x86_64 or aarch64")


def _use_aioti_on(kind: str) -> tuple[int, int]:
    async def main() -> tuple[int, int]:
        current_loop()  # what every request does first
        assert _in_thread(_sched)[1] != 100_000  # threads started from here: not passed on
        return _sched()

    return asyncio.run(main()) if kind == "asyncio" else trio.run(main)


@pytest.mark.parametrize("kind", ["asyncio", "trio"])
def test_a_loop_thread_gets_a_short_slice_and_keeps_its_nice_value(kind):
    def run() -> tuple[tuple[int, int], tuple[int, int]]:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 3)  # this thread only
        return _sched(), _use_aioti_on(kind)

    before, after = _in_thread(run)
    assert before[0] == 3 and before[1] != 100_000
    assert after == (3, 100_000)


def test_the_slice_is_left_alone_when_turned_off(monkeypatch):
    monkeypatch.setenv("AIOTI_LOOP_SLICE_US", "0")
    before, after = _in_thread(lambda: (_sched(), _use_aioti_on("asyncio")))
    assert after == before and after[1] != 100_000
