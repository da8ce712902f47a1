"""Where a lone worker's time goes: the mid MLP on one worker at concurrency 64, each step timed.

    python benchmarks/worker_split.py [cuda|cpu] [--duration S]

Per step, over the measured run: how many calls, share of the wall time, p50 / p90 / max in us.
`native` is the time inside the native run loop, timed in C by a copy of `runmany.c` that
records clock_gettime(CLOCK_MONOTONIC), the clock of time.perf_counter on Linux; `release` and
`reacquire` are the gaps on either side of it: handing the GIL over, and taking it back (a wait
behind whichever thread held it). Raw rows run the same model in one plain thread, a native
call per run ("raw, a call per run": the CUDA section's raw threads) or 64 runs per call.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from ctypes import c_int32, c_size_t, c_void_p
from pathlib import Path
from typing import Any

import anyio
import torch

import aioti
from aioti.cli import measure
from aioti.core import container as core_container
from aioti.core import open_container, open_model
from aioti.core.library import handles_from_tensors
from aioti.runtime import dispatch
from aioti.testing import compile_model

TIMED_RUN_MANY = r"""
#include <stddef.h>
#include <time.h>
typedef int (*run_fn)(void *, void **, size_t, void **, size_t, void *, void *);
long long t_start, t_end;
static long long now(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
int aioti_run_many(run_fn run, void *c, void **in, size_t n_in, void **out, size_t n_out,
                   size_t count, void *stream, size_t *done) {
    t_start = now();
    for (size_t i = 0; i < count; i++) {
        int code = run(c, in + i * n_in, n_in, out + i * n_out, n_out, stream, (void *)0);
        if (code) { *done = i; t_end = now(); return code; }
    }
    *done = count; t_end = now(); return 0;
}
"""

steps: dict[str, list[int]] = {}


def _record(step: str, ns: int) -> None:
    steps.setdefault(step, []).append(ns)


def timed_native() -> Callable[..., int]:
    """A stand-in for the native run loop that records its split (see the module doc)."""
    tmp = Path(tempfile.mkdtemp())
    (tmp / "timed.c").write_text(TIMED_RUN_MANY)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(tmp / "timed.so"),
                    str(tmp / "timed.c")], check=True)
    lib = ctypes.CDLL(str(tmp / "timed.so"))
    fn = lib.aioti_run_many
    fn.argtypes = [c_void_p, c_void_p, c_void_p, c_size_t, c_void_p, c_size_t, c_size_t,
                   c_void_p, c_void_p]
    fn.restype = c_int32
    start, end = (ctypes.c_longlong.in_dll(lib, name) for name in ("t_start", "t_end"))

    def run(*args: Any) -> int:
        before = time.perf_counter_ns()
        code = fn(*args)
        after = time.perf_counter_ns()
        _record("release", start.value - before)
        _record("native", end.value - start.value)
        _record("reacquire", after - end.value)
        _record("runs", args[6])
        return code

    return run


def time_method(cls: type, name: str, step: str) -> None:
    orig = getattr(cls, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter_ns()
        try:
            return orig(*args, **kwargs)
        finally:
            _record(step, time.perf_counter_ns() - t)

    setattr(cls, name, wrapper)


def summary(wall: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for step, v in steps.items():
        if step == "runs" or not v:
            continue
        ordered = sorted(v)
        out[step] = [len(v), round(sum(v) / 1e9 / wall, 3), round(statistics.median(v) / 1e3, 1),
                     round(ordered[int(0.9 * len(v))] / 1e3, 1), round(ordered[-1] / 1e3)]
    if steps.get("runs"):
        out["native_us_per_run"] = round(sum(steps["native"]) / sum(steps["runs"]) / 1e3, 1)
    return out


def aioti_row(path: Path, x: torch.Tensor, device: str, duration: float,
              native: Callable[..., int]) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with aioti.load(path, device=device, workers=1) as model:
            model._container._run_many_fn = native
            await model.run([x])
            steps.clear()
            t0 = time.perf_counter()
            row = await measure(model, [x], 64, duration)
            split = summary(time.perf_counter() - t0)
            batches = steps.get("process", [])
            split["mean_batch"] = round(row["requests"] / max(1, len(batches)), 1)
            return {"req_s": round(row["requests_per_s"]), **split}

    return anyio.run(go)


def raw_row(path: Path, x: torch.Tensor, device: str, duration: float, per_call: int,
            native: Callable[..., int]) -> dict[str, Any]:
    c = open_container(open_model(path), device=device)
    c._run_many_fn = native
    n = 0

    def work() -> None:
        nonlocal n
        stream = torch.cuda.Stream() if device == "cuda" else None
        if stream is not None:
            torch.cuda.set_stream(stream)
        handle = stream.cuda_stream if stream is not None else None
        stop = time.perf_counter() + duration
        while time.perf_counter() < stop:
            if per_call == 1:
                for _ in range(64):
                    c._run(handles_from_tensors([x]), handle)
            else:
                c.run_many([[x]] * per_call, handle)
            if stream is not None:
                stream.synchronize()
            n += 64

    steps.clear()
    t0 = time.perf_counter()
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    wall = time.perf_counter() - t0
    row = {"runs_s": round(n / wall), **summary(wall)}
    c.delete()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("device", nargs="?", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--duration", type=float, default=2.0)
    args = ap.parse_args()
    time_method(dispatch.Dispatcher, "_run", "process")  # the runtime's per-batch steps
    time_method(dispatch.Dispatcher, "_complete", "complete")
    time_method(dispatch.Dispatcher, "begin", "begin")
    time_method(core_container.Container, "run_many", "run_many")
    if args.device == "cuda":
        from aioti.backends.cuda import CudaBackend

        time_method(CudaBackend, "begin_batch", "begin_batch")
        time_method(CudaBackend, "finish", "finish")
        time_method(CudaBackend, "ready", "ready")
    native = timed_native()
    path = compile_model("mid_mlp", args.device)
    print("steps: [calls, share of wall, p50 us, p90 us, max us]")
    for batch in (1, 64):
        x = torch.randn(batch, 1024, device=args.device)
        for name, fn in (("raw, a call per run", lambda: raw_row(path, x, args.device,
                                                                args.duration, 1, native)),
                         ("raw, 64 runs per call", lambda: raw_row(path, x, args.device,
                                                                  args.duration, 64, native)),
                         ("aioti c64, 1 worker", lambda: aioti_row(path, x, args.device,
                                                                   args.duration, native))):
            print(json.dumps({"batch": batch, "config": name, **fn()}), flush=True)


if __name__ == "__main__":
    main()
