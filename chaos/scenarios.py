"""Chaos scenarios, one per call of this script (`run.py` starts each in a child process of its
own, with a timeout): python chaos/scenarios.py NAME LOOP MODE.

The models run on `$AIOTI_CHAOS_DEVICE` (`run.py --device`; "cpu" by default); on "cuda" the
modes "graphs" and "graphs_batched" add CUDA graph replay to "plain" and "batched". The mode
"pool" loads two replicas on that device behind one model.

Each prints one `RESULT {json}` line with its figures: requests sent / completed / cancelled /
failed (an expected error), `wrong` (a wrong output, a torn one, or an unexpected exception
type), `rss_mb` (resident memory growth over the scenario's steady part) and `note`. A crash or
hang shows as no RESULT line (the driver reports the exit code or the timeout).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import torch

import aioti
from aioti.testing import compile_model, eager_model

Figures = dict[str, Any]

#: where the scenarios' models and inputs are
DEVICE = os.environ.get("AIOTI_CHAOS_DEVICE", "cpu")


def randn(*shape: int, **kw: Any) -> torch.Tensor:
    """`torch.randn` on `DEVICE`."""
    return torch.randn(*shape, **kw).to(DEVICE)


def small() -> Path:
    """The small MLP, compiled for `DEVICE`."""
    return compile_model("small_mlp", DEVICE)


def eager_small() -> torch.nn.Module:
    return eager_model("small_mlp", DEVICE)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def options(mode: str, max_batch_size: int = 32) -> dict[str, Any]:
    """`aioti.load`'s keywords for a mode: plain, batched, on_loop, graphs, graphs_batched,
    workers (plain with three workers: the small model gets one on the CPU), and pool, pool_batched,
    pool_on_loop (two replicas on `DEVICE`, a `ReplicaPool`)."""
    batching = None if mode in ("plain", "graphs", "pool", "workers") else aioti.Batching(
        max_batch_size, 1.0, on_loop=mode.endswith("on_loop"))
    graphs = aioti.CudaGraphs() if mode.startswith("graphs") else None
    device: str | list[str] = [DEVICE, DEVICE] if mode.startswith("pool") else DEVICE
    return {"device": device, "batching": batching, "cuda_graphs": graphs,
            "workers": 3 if mode == "workers" else None}


def figures(**kw: Any) -> Figures:
    out = {"sent": 0, "completed": 0, "cancelled": 0, "failed": 0, "wrong": 0, "rss_mb": 0.0,
           "note": ""}
    out.update(kw)
    return out


def close_to(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def two_weight_sets() -> tuple[list[dict[str, torch.Tensor]], torch.Tensor,
                                 list[torch.Tensor]]:
    """The small MLP's weights and a second set (scaled by -0.5), an input, and the eager
    outputs of each set on it: a torn output matches neither."""
    a, b = eager_small(), eager_small()
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(-0.5)
    x = randn(2, 64)
    return [a.state_dict(), b.state_dict()], x, [a(x).detach(), b(x).detach()]


async def counted_call(f: Figures, model: Any, x: torch.Tensor, ref: torch.Tensor,
                       refused: type[Exception]) -> bool:
    """One call, counted in `f` (completed, wrong, or failed with the expected `refused`);
    True when it was refused."""
    f["sent"] += 1
    try:
        out = await model(x)
    except refused:
        f["failed"] += 1
        return True
    f["completed" if close_to(out, ref) else "wrong"] += 1
    return False


async def call_by_deadline(f: Figures, deadline_s: float, model: Any, x: torch.Tensor,
                           ref: torch.Tensor, refused: type[Exception]) -> bool:
    """`counted_call` within `deadline_s`, a cancellation counted in `f`; True when refused."""
    with anyio.move_on_after(deadline_s) as scope:
        if await counted_call(f, model, x, ref, refused):
            return True
    if scope.cancelled_caught:
        f["cancelled"] += 1
    return False


async def all_callers(caller: Callable[[int], Awaitable[None]], n: int = 64) -> None:
    """`caller(i)` for i in range(n), all at once, until each returns."""
    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(caller, i)


# --- scenarios ------------------------------------------------------------------------------

async def cancel_storm(mode: str) -> Figures:
    """64 callers, each request with a random deadline of 0-10 ms: many are cancelled queued or
    running; every completed output is right, the counts add up, memory stays flat."""
    eager = eager_small()
    f = figures()
    async with aioti.load(small(), **options(mode)) as model:
        xs = [randn(1 + i % 4, 64) for i in range(64)]
        refs = [eager(x).detach() for x in xs]
        base = None

        async def caller(i: int) -> None:
            rnd = random.Random(i)
            for _ in range(150):
                f["sent"] += 1
                with anyio.move_on_after(rnd.random() * 0.01) as scope:
                    out = await model(xs[i])
                    if close_to(out, refs[i]):
                        f["completed"] += 1
                    else:
                        f["wrong"] += 1
                if scope.cancelled_caught:
                    f["cancelled"] += 1

        for round_ in range(3):
            await all_callers(caller)
            gc.collect()
            if round_ == 0:
                base = rss_mb()
        with anyio.fail_after(10):
            while model.stats()["running"] or model.stats()["queued"]:
                await anyio.sleep(0.001)
        s = model.stats()
        f["rss_mb"] = round(rss_mb() - (base or 0), 1)
        if s["queued"] or s["running"]:
            f["wrong"] += 1
            f["note"] = f"left queued/running: {s}"
    return f


async def hot_swap_under_load(mode: str) -> Figures:
    """Callers run while the weights flip between two sets 100 times: every output equals the
    eager module with one set or the other (a torn output matches neither)."""
    sets, x, refs = two_weight_sets()
    f = figures()
    done = False
    async with aioti.load(small(), **options(mode)) as model:

        async def caller() -> None:
            while not done:
                f["sent"] += 1
                out = await model(x)
                if close_to(out, refs[0]) or close_to(out, refs[1]):
                    f["completed"] += 1
                else:
                    f["wrong"] += 1

        async with anyio.create_task_group() as tg:
            for _ in range(32):
                tg.start_soon(caller)
            for i in range(100):
                await model.hot_swap(sets[(i + 1) % 2])
                await anyio.sleep(0)
            done = True
        final = await model(x)
        if not close_to(final, refs[0]):  # 100 swaps: back on the first set
            f["wrong"] += 1
            f["note"] = "after 100 swaps the outputs are not the first set's"
    return f


async def close_under_load(mode: str) -> Figures:
    """aclose() while 64 callers hammer the model: each call ends with an output or a
    ClosedError, and closing returns."""
    eager = eager_small()
    x = randn(3, 64)
    ref = eager(x).detach()
    f = figures()
    model = await aioti.load(small(), **options(mode))

    async def caller() -> None:
        while not await counted_call(f, model, x, ref, aioti.ClosedError):
            pass

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(64):
                tg.start_soon(caller)
            await anyio.sleep(0.2)
            await model.aclose(cancel_queued=True)
    return f


async def backpressure(mode: str) -> Figures:
    """max_queue 4 under 64 callers, half waiting for room and half refused: every call ends
    with an output or QueueFullError."""
    eager = eager_small()
    x = randn(1, 64)
    ref = eager(x).detach()
    f = figures()
    for on_full in ("wait", "raise"):
        async with aioti.load(small(), max_queue=4, on_full=on_full,
                              **options(mode)) as model:

            async def caller() -> None:
                for _ in range(100):
                    if await counted_call(f, model, x, ref, aioti.QueueFullError):
                        await anyio.sleep(0)

            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for _ in range(64):
                        tg.start_soon(caller)
    return f


async def room_storm(mode: str) -> Figures:
    """max_queue 2, callers waiting for room, each call with a random deadline of 0-4 ms (many
    are cancelled while they wait for room, some just after they were given it), then aclose
    with requests queued: every call ends with an output, a cancellation or ClosedError, and
    closing ends every caller."""
    eager = eager_small()
    x = randn(2, 64)
    ref = eager(x).detach()
    f = figures()
    model = await aioti.load(small(), max_queue=2, on_full="wait", **options(mode))

    async def caller(i: int) -> None:
        rnd = random.Random(i)
        while not await call_by_deadline(f, rnd.random() * 0.004, model, x, ref,
                                         aioti.ClosedError):
            pass

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(64):
                tg.start_soon(caller, i)
            await anyio.sleep(1.5)
            await model.aclose(cancel_queued=True)
    if f["failed"] != 64:
        f["wrong"] += 1
        f["note"] = f"{f['failed']} callers saw ClosedError, not 64"
    return f


async def worker_fault(mode: str) -> Figures:
    """Worker 0 of two fails for a reason of the runtime's own (injected where it takes its
    next batch, from the 50th take on) while 64 callers, some cancelled, load the model: each
    call ends with a right output, its cancellation, or a `ClosedError` naming the fault; none
    hangs; the model then says it is unhealthy, and why (its other worker does not serve on).
    In a pool only replica 0's worker fails: every call gets a right output, and the pool stays
    healthy."""
    eager = eager_small()
    f = figures()
    pool = mode.startswith("pool")
    async with aioti.load(small(), **{**options(mode), "workers": 2}) as model:
        xs = [randn(1 + i % 4, 64) for i in range(64)]
        refs = [eager(x).detach() for x in xs]
        queue = (model.replicas[0].dispatcher if pool else model._dispatcher).queue
        real_take, takes = queue.take, [0]

        def take(index: int, in_flight: bool) -> Any:
            takes[0] += 1
            if takes[0] >= 50 and index == 0:
                raise RuntimeError("injected fault")
            return real_take(index, in_flight)

        queue.take = take

        async def caller(i: int) -> None:
            rnd = random.Random(i)
            for _ in range(100):
                if await call_by_deadline(f, rnd.random() * 0.01, model, xs[i], refs[i],
                                          aioti.ClosedError):
                    return

        with anyio.fail_after(60):
            await all_callers(caller)
        s = model.stats()
        if not pool and f["failed"]:
            try:
                await model(xs[0])
            except aioti.ClosedError as exc:
                if "injected fault" not in str(exc):
                    f["wrong"] += 1
                    f["note"] = f"refused without the cause: {exc}"
        if pool:
            healthy = [r["healthy"] for r in s["replicas"]]
            if f["failed"] or not model.healthy or (takes[0] >= 50 and healthy != [False, True]):
                f["wrong"] += 1
                f["note"] = f"pool: {f['failed']} refused, replicas healthy {healthy}"
        elif takes[0] >= 50 and (model.healthy or "injected fault" not in (s["fault"] or "")):
            f["wrong"] += 1
            f["note"] = f"failed workers, yet healthy {model.healthy}, fault {s['fault']!r}"
        if takes[0] < 50:
            f["note"] = f"the workers took {takes[0]} batches: the fault was not reached"
    return f


def malformed_inputs() -> list[tuple[str, Callable[[], Any]]]:
    x = randn(4, 64)
    c = randn(4, 64, dtype=torch.complex64)
    return [
        ("wrong dtype", lambda: x.double()),
        ("int", lambda: x.long()),
        ("rank 1", lambda: x[0]),
        ("rank 3", lambda: x[None]),
        ("static size", lambda: randn(4, 63)),
        ("batch 0", lambda: randn(0, 64)),
        ("too many rows", lambda: randn(5000, 64)),
        ("transposed", lambda: randn(64, 4).t()),
        ("strided view", lambda: randn(4, 128)[:, ::2]),
        ("expanded", lambda: randn(1, 64).expand(4, 64)),
        ("sparse coo", lambda: x.to_sparse()),
        ("sparse csr", lambda: x.to_sparse_csr()),
        ("sparse csc", lambda: x.to_sparse_csc()),
        ("nested", lambda: torch.nested.nested_tensor([randn(2, 64), randn(3, 64)])),
        ("negative bit", lambda: torch._neg_view(x)),
        ("conjugate bit", lambda: c.conj()),
        ("meta", lambda: torch.empty(4, 64, device="meta")),
        ("int instead of tensor", lambda: 3),
        ("None", lambda: None),
        ("list", lambda: [1.0] * 64),
        ("numpy-like str", lambda: "x"),
    ]


async def malformed(mode: str) -> Figures:
    """Every kind of bad input, 50 times each: each call raises InputError (an AiotiError
    naming the input), never another exception type or a silent result; the model still
    serves afterwards."""
    import warnings

    warnings.simplefilter("ignore")
    eager = eager_small()
    f = figures()
    bad_kinds: list[str] = []
    async with aioti.load(small(), **options(mode)) as model:
        for name, make in malformed_inputs():
            for _ in range(50):
                f["sent"] += 1
                try:
                    await model(make())
                except aioti.InputError:
                    f["failed"] += 1
                    continue
                except Exception as exc:  # noqa: BLE001 - the figure counts them
                    f["wrong"] += 1
                    bad_kinds.append(f"{name}: {type(exc).__name__}")
                    break
                f["wrong"] += 1  # ran: a silent result for an input that is not the model's
                bad_kinds.append(f"{name}: ran")
                break
            for args in ((), (randn(2, 64), randn(2, 64))):  # wrong counts
                f["sent"] += 1
                try:
                    await model(*args)
                except aioti.InputError:
                    f["failed"] += 1
                except Exception as exc:  # noqa: BLE001
                    f["wrong"] += 1
                    bad_kinds.append(f"{len(args)} inputs: {type(exc).__name__}")
        x = randn(4, 64)
        f["sent"] += 1
        if close_to(await model(x), eager(x).detach()):
            f["completed"] += 1
        else:
            f["wrong"] += 1
    f["note"] = "; ".join(sorted(set(bad_kinds)))
    return f


async def truncated_library(mode: str) -> Figures:
    """Packages whose model library is cut short (re-zipped whole, so the zip is valid) at 10
    points: each load raises ModelLoadError, in this process (a SIGBUS would end it)."""
    src = compile_model("small_mlp")
    f = figures()
    bad: list[str] = []
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(src) as zf:
        lib = next(i for i in zf.infolist() if i.filename.endswith(".wrapper.so"))
        data = zf.read(lib)
        for k in range(1, 11):
            cut = len(data) * k // 11
            path = Path(tmp) / f"cut{k}.pt2"
            with zipfile.ZipFile(path, "w") as out:
                for info in zf.infolist():
                    out.writestr(info.filename, data[:cut] if info is lib else zf.read(info))
            f["sent"] += 1
            try:
                async with aioti.load(path, cache_dir=Path(tmp) / "cache") as model:
                    await model(randn(1, 64))
                bad.append(f"cut at {k}/11 loaded and ran")
                f["wrong"] += 1
            except aioti.ModelLoadError:
                f["failed"] += 1
            except Exception as exc:  # noqa: BLE001
                bad.append(f"cut at {k}/11: {type(exc).__name__}")
                f["wrong"] += 1
    f["note"] = "; ".join(bad)
    return f


async def on_loop_stall(mode: str) -> Figures:
    """On-loop batching, max_queue 8: a loop in another thread fills the queue and its thread
    then blocks; callers on this loop must still be served (its runs take the queue)."""
    x = randn(1, 64)
    ref = eager_small()(x).detach()
    f = figures()
    async with aioti.load(compile_model("small_mlp"), max_queue=8,
                          batching=aioti.Batching(8, 1.0, on_loop=True)) as model:
        filled = threading.Event()
        release = threading.Event()

        def other_thread() -> None:
            async def fill() -> None:
                tasks = [asyncio.ensure_future(model(x)) for _ in range(8)]
                await asyncio.sleep(0)  # the tasks queue their requests
                filled.set()
                release.wait(30)  # the loop's thread blocks: its scheduled run never comes
                for t in tasks:
                    t.cancel()

            asyncio.run(fill())

        t = threading.Thread(target=other_thread, daemon=True)
        t.start()
        filled.wait(10)
        try:
            with anyio.move_on_after(10) as scope:
                for _ in range(20):
                    f["sent"] += 1
                    out = await model(x)
                    f["completed" if close_to(out, ref) else "wrong"] += 1
            if scope.cancelled_caught:
                f["wrong"] += 1
                f["note"] = "callers on this loop waited 10 s: stalled by the other loop"
        finally:
            release.set()
            t.join(10)
    return f


async def soak(mode: str) -> Figures:
    """30k requests from 64 callers with distinct inputs: right outputs, flat memory."""
    eager = eager_small()
    xs = [randn(1 + i % 3, 64) for i in range(64)]
    refs = [eager(x).detach() for x in xs]
    f = figures()
    async with aioti.load(small(), **options(mode)) as model:
        marks: list[float] = []

        async def caller(i: int, n: int) -> None:
            for _ in range(n):
                f["sent"] += 1
                out = await model(xs[i])
                f["completed" if close_to(out, refs[i]) else "wrong"] += 1

        for n in (30, 200, 200):
            async with anyio.create_task_group() as tg:
                for i in range(64):
                    tg.start_soon(caller, i, n)
            gc.collect()
            marks.append(rss_mb())
        f["rss_mb"] = round(marks[-1] - marks[0], 1)
    return f


def several_loops(mode: str) -> Figures:
    """One model, four loops in four threads (asyncio and trio alternately), 32 callers each:
    every output is right."""
    eager = eager_small()
    f = figures()
    lock = threading.Lock()
    model_box: list[Any] = []

    async def opener() -> None:
        model_box.append(await aioti.load(small(), **options(mode)))

    anyio.run(opener)
    model = model_box[0]

    async def callers(seed: int) -> None:
        xs = [randn(1 + i % 3, 64, generator=torch.Generator().manual_seed(seed + i))
              for i in range(32)]
        refs = [eager(x).detach() for x in xs]

        async def one(i: int) -> None:
            for _ in range(100):
                out = await model(xs[i])
                with lock:
                    f["sent"] += 1
                    f["completed" if close_to(out, refs[i]) else "wrong"] += 1

        async with anyio.create_task_group() as tg:
            for i in range(32):
                tg.start_soon(one, i)

    threads = [threading.Thread(target=anyio.run, args=(callers, k * 100),
                                kwargs={"backend": ("asyncio", "trio")[k % 2]})
               for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    anyio.run(model.aclose)
    return f


def swaps_from_loops(mode: str) -> Figures:
    """One model, callers on an asyncio and a trio loop in two threads, while a third thread's
    loop swaps the weights between two sets 50 times, and a fourth's (trio) updates the
    inactive set and swaps too: every output equals one set's (a torn output matches neither),
    and every swap succeeds."""
    sets, x, refs = two_weight_sets()
    f = figures()
    lock = threading.Lock()
    model_box: list[Any] = []
    stop = threading.Event()

    async def opener() -> None:
        model_box.append(await aioti.load(small(), **options(mode)))

    anyio.run(opener)
    model = model_box[0]

    async def callers() -> None:
        async def one() -> None:
            while not stop.is_set():
                try:
                    out = await model(x)
                except Exception as exc:  # noqa: BLE001 - reported as the scenario's failure
                    with lock:
                        f["wrong"] += 1
                        f["note"] = f"a call failed: {type(exc).__name__}: {exc}"
                    return
                with lock:
                    f["sent"] += 1
                    f["completed" if close_to(out, refs[0]) or close_to(out, refs[1])
                      else "wrong"] += 1

        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(one)

    async def swapper(first: int) -> None:
        try:
            for i in range(50):
                if first:
                    await model.update_inactive_constants(sets[(i + first) % 2])
                    await model.swap_constants()
                else:
                    await model.hot_swap(sets[(i + 1) % 2])
                await anyio.sleep(0.001)
        except Exception as exc:  # noqa: BLE001 - reported as the scenario's failure
            with lock:
                f["wrong"] += 1
                f["note"] = f"a swap failed: {type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=anyio.run, args=(callers,), kwargs={"backend": k})
               for k in ("asyncio", "trio")]
    swappers = [threading.Thread(target=anyio.run, args=(swapper, k),
                                 kwargs={"backend": ("asyncio", "trio")[k]}) for k in (0, 1)]
    for t in threads + swappers:
        t.start()
    for t in swappers:
        t.join(60)
    stop.set()
    for t in threads:
        t.join(60)
    if any(t.is_alive() for t in threads + swappers):
        f["wrong"] += 1
        f["note"] = "a thread did not finish"
    anyio.run(model.aclose)
    return f


EXIT_CHILD = """
import sys, threading, time, random, anyio, torch, aioti
from aioti.testing import compile_model, eager_model
sets = [eager_model("mid_mlp").state_dict(), {k: v * -0.5 for k, v in
        eager_model("mid_mlp").state_dict().items()}]
ready = threading.Event()
async def main():
    model = await aioti.load(compile_model("mid_mlp"))
    ready.set()
    i = 0
    while True:
        await model.hot_swap(sets[i % 2])
        i += 1
threading.Thread(target=anyio.run, args=(main,), kwargs={"backend": sys.argv[1]},
                 daemon=True).start()
ready.wait(60)
time.sleep(random.random() * 0.1)
"""


def exit_during_swaps(loop: str, runs: int) -> Figures:
    """The interpreter exits while a loop in a daemon thread hot-swaps in a loop, `runs` times:
    every child exits cleanly (no abort)."""
    from concurrent.futures import ThreadPoolExecutor

    f = figures(sent=runs)
    codes: dict[int, int] = {}

    def child(_: int) -> int:
        return subprocess.run([sys.executable, "-c", EXIT_CHILD, loop], capture_output=True,
                              timeout=60).returncode

    with ThreadPoolExecutor(2) as pool:  # two at a time: one per core
        for code in pool.map(child, range(runs)):
            if code == 0:
                f["completed"] += 1
            else:
                f["wrong"] += 1
                codes[code] = codes.get(code, 0) + 1
    f["note"] = ", ".join(f"exit {c}: {n}" for c, n in codes.items())
    return f


def fork_child(mode: str) -> Figures:
    """A model loaded before fork(): the child's call raises ClosedError at once."""
    f = figures(sent=1)
    model_box: list[Any] = []

    async def opener() -> None:
        model_box.append(await aioti.load(small(), **options(mode)))

    anyio.run(opener)
    pid = os.fork()
    if pid == 0:
        async def child() -> int:
            try:
                with anyio.fail_after(5):
                    await model_box[0](randn(1, 64))
            except aioti.ClosedError:
                return 0
            except BaseException:  # noqa: BLE001
                return 2
            return 3

        os._exit(anyio.run(child))
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    f["failed" if code == 0 else "wrong"] += 1
    if code:
        f["note"] = f"child exit {code}"
    anyio.run(model_box[0].aclose)
    return f


ASYNC: dict[str, Callable[[str], Awaitable[Figures]]] = {
    "cancel_storm": cancel_storm, "hot_swap_under_load": hot_swap_under_load,
    "close_under_load": close_under_load, "backpressure": backpressure,
    "room_storm": room_storm,
    "malformed": malformed, "truncated_library": truncated_library,
    "on_loop_stall": on_loop_stall, "soak": soak, "worker_fault": worker_fault,
}


def main() -> None:
    name, loop, mode = sys.argv[1:4]
    torch.manual_seed(0)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a crash leaves no core file behind
    if name in ASYNC:
        out = anyio.run(ASYNC[name], mode, backend=loop)
    elif name == "several_loops":
        out = several_loops(mode)
    elif name == "swaps_from_loops":
        out = swaps_from_loops(mode)
    elif name == "exit_during_swaps":
        out = exit_during_swaps(loop, int(mode))
    elif name == "fork":
        out = fork_child(mode)
    else:
        raise SystemExit(f"unknown scenario {name!r}")
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
