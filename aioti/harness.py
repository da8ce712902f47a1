"""The closed-loop load harness shared by `aioti bench` and `benchmarks/`: `concurrency` tasks
calling a model back to back for a while, with the request rate, latency percentiles and the
event loop's lag (a task sleeping 1 ms records its overshoot)."""

from __future__ import annotations

import sys
import time
from typing import Any

from .errors import check_count, check_duration

__all__ = ["c1_figure", "gather", "measure", "percentile"]


async def measure(model: Any, inputs: list[Any], concurrency: int, duration: float,
                  progress: bool = False) -> dict[str, Any]:
    """Closed-loop load from `concurrency` tasks for `duration` s: rate, latency, loop lag."""
    import anyio

    check_count("concurrency", concurrency)
    check_duration("duration", duration, positive=True)

    lat: list[float] = []
    lags: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration

    async def client() -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                await model.run(inputs)
            except Exception:
                errors += 1
            lat.append(time.perf_counter() - t0)

    bar = Progress(duration) if progress else None

    async def lag() -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await anyio.sleep(0.001)
            lags.append(time.perf_counter() - t0 - 0.001)
            if bar is not None:
                bar.update(duration - max(0.0, stop - time.perf_counter()), len(lat))

    t0 = time.perf_counter()
    await gather([lag] + [client] * concurrency)
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return {"requests_per_s": len(lat) / elapsed, "p50_ms": percentile(lat, 50) * 1e3,
            "p90_ms": percentile(lat, 90) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
            "loop_lag_p99_ms": percentile(lags, 99) * 1e3, "errors": errors, "requests": len(lat)}


_DIRECT = """
import sys, torch
from aioti.core import open_container, open_model
from aioti.harness import _direct_here
path, name, shapes, duration = sys.argv[1], sys.argv[2], eval(sys.argv[3]), float(sys.argv[4])
c = open_container(open_model(path, name))
inputs = [torch.zeros(s, dtype=getattr(torch, d)) for s, d in shapes]
c.run(inputs)
print("P50", _direct_here(c, inputs, duration))
"""


async def c1_figure(model: Any, inputs: list[Any], duration: float) -> dict[str, Any]:
    """aioti's p50 latency at concurrency 1 against the direct synchronous call of the model's
    own container on the same inputs (a run, and on a GPU a synchronize): what one caller pays
    for going through the event loop. On a GPU the direct calls run on the loop's thread,
    blocking it (a benchmark's choice, not a service's), taking turns with aioti's; a CPU model's
    run in a process of its own, as a synchronous caller's would: a second thread's OpenMP team
    in this process would slow both it and the model's own (docs/devices.md)."""
    direct = None
    if model.container.device.type == "cpu":
        direct = await _direct_in_child(model, inputs, duration)
    if direct is None:
        return await _c1_in_turns(model, inputs, duration)
    row = await measure(model, inputs, 1, duration)
    p50 = direct * 1e3
    return {"c1_p50_ms": row["p50_ms"], "direct_p50_ms": p50, "c1_vs_direct": row["p50_ms"] / p50,
            "direct_measured_in": "child process"}


async def _c1_in_turns(model: Any, inputs: list[Any], duration: float, turns: int = 6
                       ) -> dict[str, Any]:
    """`c1_figure` with the direct calls on the loop's thread: the two take `turns` turns of
    `duration / turns` s each (after one of warm-up), and the figure is the median of the turns'
    ratios. A GPU host's speed moves by a third within seconds: measured one after the other,
    the two drift apart."""
    import statistics

    d = duration / turns
    direct: list[float] = []
    c1: list[float] = []
    for turn in range(turns + 1):
        a = _direct_here(model.container, inputs, d)
        b = (await measure(model, inputs, 1, d))["p50_ms"] / 1e3
        if turn:
            direct.append(a)
            c1.append(b)
    med = statistics.median
    ratios = [b / a for a, b in zip(direct, c1)]
    return {"c1_p50_ms": med(c1) * 1e3, "direct_p50_ms": med(direct) * 1e3,
            "c1_vs_direct": med(ratios), "c1_vs_direct_turns": ratios,
            "direct_measured_in": f"loop thread, {turns} turns"}


def _direct_here(container: Any, inputs: list[Any], duration: float) -> float:
    """p50 (s) of the direct call on this thread."""
    import torch

    cuda = container.device.type == "cuda"
    direct: list[float] = []
    stop = time.perf_counter() + duration
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        container.run(inputs)
        if cuda:
            torch.cuda.synchronize(container.device)
        direct.append(time.perf_counter() - t0)
    return percentile(direct, 50)


async def _direct_in_child(model: Any, inputs: list[Any], duration: float) -> float | None:
    """p50 (s) of the direct call in a child process on inputs of the same shapes and dtypes;
    None where it cannot be made there (a package without weights of its own, inputs that are
    not all tensors, a child that fails or takes over two minutes)."""
    import subprocess

    import anyio
    import torch

    files = model.files
    source = files.package or files.library
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        return None
    shapes = repr([(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in inputs])
    cmd = [sys.executable, "-c", _DIRECT, str(source), files.name, shapes, str(duration)]
    done = None
    with anyio.move_on_after(120 + duration):
        try:
            done = await anyio.run_process(cmd, check=False, stderr=subprocess.DEVNULL)
        except OSError:
            return None
    if done is None:
        return None
    for line in done.stdout.decode().splitlines():
        if line.startswith("P50 "):
            return float(line[4:])
    return None


async def gather(fns: list[Any]) -> None:
    """Run the coroutine functions as concurrent tasks of the running loop's own kind (an asyncio
    task or a trio task each, as a service's request handlers are; anyio's task groups would
    add a wrapper frame to every step)."""
    from .loops import current_loop

    if current_loop().kind == "trio":
        import trio

        async with trio.open_nursery() as nursery:
            for fn in fns:
                nursery.start_soon(fn)
        return
    import asyncio

    await asyncio.gather(*(fn() for fn in fns))


class Progress:
    """A progress bar on stderr (rich's, when the `cli` extra is installed)."""

    def __init__(self, total: float) -> None:
        try:
            from rich.progress import Progress
        except ImportError:
            self._rich = None
        else:
            self._rich = Progress(transient=True)
            self._rich.start()
            self._task = self._rich.add_task("benchmarking", total=total)
        self._last = 0.0

    def update(self, done: float, requests: int) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=done, description=f"{requests} requests")
        elif time.perf_counter() - self._last > 0.1:
            self._last = time.perf_counter()
            print(f"\r{requests} requests, {done:.1f} s", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
        else:
            print(file=sys.stderr)


def percentile(data: list[float], q: float) -> float:
    if not data:
        return float("nan")
    s = sorted(data)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]
