"""The async runtime on asyncio and trio: concurrency, cancellation, backpressure, closing."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import warnings
from typing import Any

import anyio
import pytest
import torch
from load import break_workers, load_until_unhealthy, record_run_threads
from outcomes import outcome

import aioti
from aioti.backends.cpu import CpuBackend
from aioti.testing import eager_model, example_inputs

pytestmark = pytest.mark.anyio


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


async def test_await_and_async_with(models):
    model = await aioti.load(models["small_mlp"])
    try:
        assert not model.closed and model.workers == 1
        x = torch.randn(4, 64)
        assert torch.allclose(await model(x), eager_model("small_mlp")(x), atol=1e-5)
    finally:
        await model.aclose()
    assert model.closed
    async with aioti.load(models["small_mlp"]) as m2:
        assert (await m2.run([x]))[0].shape == (4, 10)
    assert m2.closed


async def test_64_concurrent_callers_match_oracle(models):
    eager = eager_model("multi_io")
    failures = []
    async with aioti.load(models["multi_io"]) as model:

        async def caller(i: int) -> None:
            for j in range(10):
                args, kwargs = example_inputs("multi_io", batch=1 + (i + j) % 7, seed=i * 100 + j)
                got = await model(*args, **kwargs)
                ref = eager(*args, **kwargs)
                if not (torch.allclose(got["sum"], ref["sum"], atol=1e-5)
                        and torch.allclose(got["pair"][1], ref["pair"][1])):
                    failures.append((i, j))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(64):
                    tg.start_soon(caller, i)
        stats = model.stats()
    assert not failures
    assert stats["completed"] == 640 and stats["failed"] == 0
    assert stats["latency_s"]["p99"] is not None


async def test_boxed_run_hands_inputs_over(models):
    async with aioti.load(models["small_mlp"]) as model:
        inputs = [torch.randn(2, 64)]
        ref = eager_model("small_mlp")(inputs[0])
        out = await model.boxed_run(inputs)
        assert inputs == [] and torch.allclose(out[0], ref, atol=1e-5)


async def test_cancel_while_queued_never_runs(models):
    async with aioti.load(models["mid_mlp"], workers=1, max_queue=256) as model:
        x = torch.randn(64, 1024)
        before = live_tensors()
        with anyio.move_on_after(0.05):
            async with anyio.create_task_group() as tg:
                for _ in range(100):
                    tg.start_soon(model.run, [x])
        with anyio.fail_after(60):
            while model.stats()["running"] or model.stats()["queued"]:
                await anyio.sleep(0.01)
        stats = model.stats()
        assert stats["cancelled"] > 0
        # Requests cancelled while queued were removed and never ran.
        assert stats["completed"] + stats["cancelled"] >= 100
        assert stats["completed"] < 100
        assert live_tensors() <= before  # no output or input kept alive


async def test_cancel_while_running_returns_at_once(models):
    async with aioti.load(models["mid_mlp"]) as model:
        x = torch.randn(256, 1024)
        await model.run([x])  # warm
        before = live_tensors()
        caught = 0
        for _ in range(20):
            with anyio.move_on_after(0.0002) as scope:
                await model.run([x])
            caught += scope.cancelled_caught
        assert caught  # on a fast machine most runs finish first; one cancel suffices
        with anyio.fail_after(30):
            while model.stats()["running"] or model.stats()["queued"]:
                await anyio.sleep(0.005)
        assert live_tensors() <= before
        assert (await model.run([x]))[0].shape == (256, 1024)  # still serving


async def test_timeout_argument(models):
    async with aioti.load(models["mid_mlp"]) as model:
        with pytest.raises(TimeoutError):
            await model.run([torch.randn(256, 1024)], timeout=1e-5)


@pytest.mark.parametrize("on_full", ["raise", "wait"])
async def test_backpressure(models, on_full):
    async with aioti.load(models["mid_mlp"], workers=1, max_queue=2, on_full=on_full) as model:
        x = torch.randn(256, 1024)
        results, errors = [], []

        async def call() -> None:
            out = await outcome(model.run([x]), aioti.QueueFullError)
            (errors if isinstance(out, aioti.QueueFullError) else results).append(out)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(12):
                    tg.start_soon(call)
        if on_full == "raise":
            assert errors and "queue is full" in str(errors[0])
            assert len(results) + len(errors) == 12
        else:
            assert not errors and len(results) == 12


async def close_while_running(model, x, n: int, *, cancel_queued: bool) -> list[str]:
    """Start `n` runs, close the model 10 ms later; each run's outcome: "ran" or "closed"."""
    outcomes = []

    async def call() -> None:
        try:
            await model.run([x])
            outcomes.append("ran")
        except aioti.ClosedError:
            outcomes.append("closed")

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(call)
            await anyio.sleep(0.01)
            await model.aclose(cancel_queued=cancel_queued)
    return outcomes


async def test_aclose_with_runs_in_flight(models):
    model = await aioti.load(models["mid_mlp"])
    x = torch.randn(64, 1024)
    outcomes = await close_while_running(model, x, 10, cancel_queued=False)
    assert len(outcomes) == 10 and all(o == "ran" for o in outcomes)  # finished, not dropped
    assert model.container.closed  # deleted only after the runs
    await model.aclose()  # twice is fine
    with pytest.raises(aioti.ClosedError):
        await model.run([x])


async def test_aclose_cancel_queued(models):
    model = await aioti.load(models["mid_mlp"], workers=1)
    outcomes = await close_while_running(model, torch.randn(256, 1024), 20, cancel_queued=True)
    assert len(outcomes) == 20 and "closed" in outcomes


async def test_errors_are_isolated(models):
    async with aioti.load(models["small_mlp"]) as model:
        good = torch.randn(3, 64)

        async def bad() -> None:
            with pytest.raises(aioti.InputError):
                await model.run([torch.randn(3, 63)])

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(bad if i % 2 else model.run, *(() if i % 2 else ([good],)))
        assert model.stats()["failed"] == 0  # rejected before queueing
        assert (await model(good)).shape == (3, 10)


@pytest.mark.parametrize("batching", [None, aioti.Batching(16, 1.0)], ids=["plain", "batched"])
async def test_a_model_whose_workers_failed_says_it_is_unhealthy_and_why(models, batching):
    """A model whose worker failed for a reason of the runtime's own serves no more requests:
    `healthy` turns False (it was True, `closed` stays False: no one closed it), `stats()`
    names the fault, `check_health` says so; closing it works, and then there is no fault."""
    async with aioti.load(models["small_mlp"], batching=batching) as model:
        assert model.healthy and await model.check_health() == [True]
        assert model.stats()["healthy"] and model.stats()["fault"] is None
        break_workers(model._dispatcher)
        await load_until_unhealthy(model, torch.randn(2, 64))
        stats = model.stats()
        assert not model.closed and await model.check_health() == [False]
        assert not stats["healthy"] and "worker 0 failed (RuntimeError: injected" in stats["fault"]
        with pytest.raises(aioti.ClosedError, match="injected into the queue"):
            await model(torch.randn(2, 64))
    assert not model.healthy and model.stats()["fault"] is not None  # the cause stays said
    async with aioti.load(models["small_mlp"]) as other:
        pass
    assert not other.healthy and other.stats()["fault"] is None  # closed as asked: no fault


@pytest.mark.parametrize("batching", [None, aioti.Batching(16, 1.0),
                                      aioti.Batching(16, 1.0, on_loop=True)],
                         ids=["plain", "batched", "on_loop"])
async def test_an_observer_that_raises_stops_nothing(models, batching):
    """`observe`'s function runs on the loop as results are delivered: one that raises is
    said once, in a RuntimeWarning, and every caller still gets its outputs (before, the
    exception reached the loop from a callback: trio ended its run with TrioInternalError)."""
    calls = 0

    def broken(latencies: list[float], waits: list[float]) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("observer bug")

    x = torch.randn(2, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with aioti.load(models["small_mlp"], batching=batching) as model:
            model.observe(broken)
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for _ in range(16):
                        tg.start_soon(model.run, [x])
            got = await model(x)
            stats = model.stats()
    said = [w for w in caught if "observer bug" in str(w.message)]
    assert got.shape == (2, 10) and stats["completed"] == 17 and stats["failed"] == 0
    assert calls >= 2 and len(said) == 1 and said[0].category is RuntimeWarning


def test_two_event_loops_in_two_threads(models):
    eager = eager_model("small_mlp")  # built once: seeding is process-global
    xs = [torch.randn(2, 64) for _ in range(50)]
    refs = [eager(x) for x in xs]

    async def main() -> bool:
        ok = True
        for x, ref in zip(xs, refs):
            ok &= bool(torch.allclose(await shared(x), ref, atol=1e-5))
        return ok

    shared = anyio.run(lambda: aioti.load(models["small_mlp"]))  # loaded on a third loop
    results = []
    threads = [threading.Thread(target=lambda b=b: results.append(anyio.run(main, backend=b)))
               for b in ("asyncio", "trio")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [True, True]
    anyio.run(shared.aclose)


@pytest.mark.parametrize("batching", [None, aioti.Batching(16, 1.0, on_loop=True)],
                         ids=["plain", "on_loop"])
def test_a_trio_guest_run_and_its_asyncio_host_both_call(models, batching):
    """trio in guest mode on an asyncio loop (one thread, both loops' tasks): each task's
    requests are delivered to its own loop. Before, an asyncio task there was taken for a trio
    one (a trio run was on) and its call failed ("must be called from async context")."""
    import asyncio

    import trio

    eager = eager_model("small_mlp")
    xs = [torch.randn(1 + i % 3, 64) for i in range(8)]
    with torch.no_grad():
        refs = [eager(x) for x in xs]

    async def calls(model: aioti.AsyncModel, i: int) -> list[bool]:
        return [torch.allclose(await model(xs[i]), refs[i], atol=1e-5) for _ in range(20)]

    async def host() -> tuple[list[list[bool]], list[list[bool]]]:
        async with aioti.load(models["small_mlp"], batching=batching) as model:
            loop = asyncio.get_running_loop()
            guest_done: asyncio.Future[Any] = loop.create_future()
            from_trio: list[list[bool]] = []

            async def trio_main() -> None:
                async def one(i: int) -> None:
                    from_trio.append(await calls(model, i))

                async with trio.open_nursery() as nursery:
                    for i in range(8):
                        nursery.start_soon(one, i)

            trio.lowlevel.start_guest_run(
                trio_main, run_sync_soon_threadsafe=loop.call_soon_threadsafe,
                done_callback=guest_done.set_result)
            from_asyncio = await asyncio.wait_for(
                asyncio.gather(*(calls(model, i) for i in range(8))), 60)
            (await asyncio.wait_for(guest_done, 60)).unwrap()
            return list(from_asyncio), from_trio

    from_asyncio, from_trio = asyncio.run(host())
    assert from_asyncio == [[True] * 20] * 8 and from_trio == [[True] * 20] * 8


def test_successive_loops_in_one_thread(models):
    """Each run of a loop in a thread gets its results on that run's loop, never on an earlier,
    finished one (aioti finds a thread's asyncio loop by thread id, checked each call)."""
    import asyncio

    import trio
    import uvloop

    x = torch.randn(2, 64)
    ref = eager_model("small_mlp")(x)
    model = anyio.run(lambda: aioti.load(models["small_mlp"]))

    async def call_asyncio() -> torch.Tensor:
        return await asyncio.wait_for(model(x), 30)

    async def call_trio() -> torch.Tensor:
        with trio.fail_after(30):
            return await model(x)

    outs = [asyncio.run(call_asyncio()), asyncio.run(call_asyncio()), trio.run(call_trio),
            uvloop.run(call_asyncio()), uvloop.run(call_asyncio()), asyncio.run(call_asyncio())]
    asyncio.run(model.aclose())
    assert all(torch.allclose(o, ref, atol=1e-5) for o in outs)


def test_unclosed_model_warns(models):
    async def main() -> None:
        model = await aioti.load(models["small_mlp"])
        await model(torch.randn(1, 64))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        anyio.run(main)
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_interpreter_exit_with_unclosed_model_does_not_hang(models, backend):
    code = textwrap.dedent(f"""
        import anyio, torch, aioti
        async def main():
            global model
            model = await aioti.load({str(models['mid_mlp'])!r})
            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(model.run, [torch.randn(64, 1024)])
                tg.cancel_scope.cancel()
        anyio.run(main, backend={backend!r})
        print("exited")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exited" in proc.stdout


def test_loop_ending_with_runs_in_flight(models):
    model = None

    async def main() -> None:
        nonlocal model
        model = await aioti.load(models["mid_mlp"])
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(model.run, [torch.randn(64, 1024)])
            await anyio.sleep(0)
            tg.cancel_scope.cancel()

    anyio.run(main)  # the loop closes while workers still run: their deliveries are dropped
    anyio.run(model.aclose)
    assert model.container.closed


@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})])
async def test_uvloop(models):
    import asyncio

    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    eager = eager_model("small_mlp")
    xs = [torch.randn(3, 64) for _ in range(64)]
    async with aioti.load(models["small_mlp"]) as model:
        outs = [None] * len(xs)

        async def call(i: int) -> None:
            outs[i] = await model(xs[i])

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for i in range(len(xs)):
                    tg.start_soon(call, i)
    assert all(torch.allclose(o, eager(x), atol=1e-5) for o, x in zip(outs, xs))


async def test_the_lead_worker_takes_lone_requests(models, cpu_backend, monkeypatch):
    """Requests one at a time all go to worker 0, the lead (on CPU the one thread that forks a
    native team), whichever worker went to sleep last; while the lead runs a batch, another
    worker takes the next request."""
    from aioti.runtime import dispatch

    monkeypatch.setattr(dispatch, "IDLE_RUN_MAX_S", 0.0)  # no run on the caller's thread
    ran_on = []

    class Recording(CpuBackend):
        def begin_batch(self, ctx, readies):
            ran_on.append(threading.current_thread().name)
            return super().begin_batch(ctx, readies)

    cpu_backend(Recording)
    async with aioti.load(models["small_mlp"], workers=3) as model:
        for _ in range(6):
            with anyio.fail_after(10):
                while len(model._dispatcher.queue._sleeping) < 3:  # every worker back asleep
                    await anyio.sleep(0.001)
            await model(torch.randn(1, 64))
        assert len(ran_on) == 6 and all(n.endswith("-worker-0") for n in ran_on), ran_on
        ran_on.clear()
        gate = threading.Event()
        real = model._dispatcher.runner._executor.run

        def held(live, stream):
            if threading.current_thread().name.endswith("-worker-0"):
                gate.wait(10)
            return real(live, stream)

        model._dispatcher.runner._executor.run = held
        async with anyio.create_task_group() as tg:
            tg.start_soon(model, torch.randn(1, 64))
            with anyio.fail_after(10):
                while len(ran_on) < 1:
                    await anyio.sleep(0.001)
                await model(torch.randn(1, 64))  # the lead is busy: another worker runs it
            gate.set()
    assert ran_on[0].endswith("-worker-0") and not ran_on[1].endswith("-worker-0"), ran_on


async def test_an_unbatched_cpu_worker_takes_a_chunk_at_a_time(models, cpu_backend):
    """64 queued requests to an unbatched CPU model are taken 16 at a time (one native call's
    chunk), not at one wake-up: each take's callers get their outputs while the worker runs
    the next, and every output is right."""
    takes: list[int] = []

    class Recording(CpuBackend):
        def begin_batch(self, ctx, readies):
            takes.append(len(readies))  # one readiness token per request of the take
            return super().begin_batch(ctx, readies)

    cpu_backend(Recording)
    async with aioti.load(models["small_mlp"], workers=1) as model:
        eager = eager_model("small_mlp")
        xs = [torch.randn(1 + i % 3, 64) for i in range(64)]
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with model._dispatcher.exclusive():  # no batch starts: the requests queue
                held.set()
                release.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        got: dict[int, torch.Tensor] = {}

        async def call(i: int) -> None:
            got[i] = await model(xs[i])

        try:
            await anyio.to_thread.run_sync(held.wait, 30)
            async with anyio.create_task_group() as tg:
                for i in range(64):
                    tg.start_soon(call, i)
                with anyio.fail_after(30):
                    while model.stats()["queued"] < 64:
                        await anyio.sleep(0.001)
                release.set()
        finally:
            release.set()
            holder.join(30)
    assert takes == [16, 16, 16, 16], takes
    assert all(torch.allclose(got[i], eager(x), atol=1e-5) for i, x in enumerate(xs))


FORK = """
import os, sys
import anyio, torch
import aioti
from aioti.testing import eager_model
path, backend = sys.argv[1], sys.argv[2]
x = torch.randn(4, 64)

async def parent():
    model = await aioti.load(path, batching=aioti.Batching(8, 1))
    with anyio.fail_after(10):
        await model(x)
    return model

model = anyio.run(parent, backend=backend)
pid = os.fork()
if pid == 0:
    async def child():
        with anyio.fail_after(30):
            try:
                await model(x)
                print("served?!")
            except aioti.ClosedError as exc:
                print("refused:", exc)
            try:
                await model.hot_swap(eager_model("small_mlp").state_dict())
            except aioti.ClosedError:
                print("swap refused")
            await model.aclose()
            async with aioti.load(path) as fresh:
                ok = torch.allclose(await fresh(x), eager_model("small_mlp")(x), atol=1e-5)
                print("fresh:", ok, flush=True)
    anyio.run(child, backend=backend)
    os._exit(0)
_, status = os.waitpid(pid, 0)

async def again():
    with anyio.fail_after(10):
        assert torch.allclose(await model(x), eager_model("small_mlp")(x), atol=1e-5)
    await model.aclose()

anyio.run(again, backend=backend)
print("child exit", os.waitstatus_to_exitcode(status), flush=True)
"""


async def test_a_model_loaded_before_a_fork_refuses_in_the_child(models, anyio_backend):
    """Worker threads do not survive a fork (a pre-forking server loading the model in its
    parent): the child's calls raise ClosedError at once instead of waiting forever, closing
    works there, a model loaded in the child serves, and the parent goes on serving."""
    with anyio.fail_after(120):
        proc = await anyio.run_process(
            [sys.executable, "-c", FORK, str(models["small_mlp"]), anyio_backend], check=False)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "refused: the model was loaded before this process was forked" in out
    assert "swap refused" in out and "fresh: True" in out and "child exit 0" in out


def test_asyncio_run_takes_the_loader():
    """`aioti.load(...)` is a coroutine too: `asyncio.run` and task factories accept it."""
    import asyncio

    from aioti.testing import compile_model

    model = asyncio.run(aioti.load(compile_model("small_mlp")))
    try:
        x = torch.randn(2, 64)
        out = anyio.run(model, x)
        with torch.no_grad():
            assert torch.allclose(out, eager_model("small_mlp")(x), atol=1e-5)
    finally:
        anyio.run(model.aclose)


async def test_a_failed_load_leaves_no_extraction_behind(models, tmp_path):
    """A load that fails after extracting the package (here: batching refused by the probe)
    removes what it extracted; one that succeeds keeps it for the next load."""
    cache = tmp_path / "cache"
    with pytest.raises(aioti.InputError, match="cannot be batched"):
        await aioti.load(models["row_mixing"], batching=aioti.Batching(), cache_dir=cache)
    assert not any(cache.rglob("*.so"))
    async with aioti.load(models["row_mixing"], cache_dir=cache):
        pass
    assert any(cache.rglob("*.so"))


def test_exit_waits_for_a_constant_operation_and_refuses_new_ones(models):
    """At interpreter exit, a constant operation in progress (here held inside its native step)
    is waited for before the workers stop, and none starts afterwards: one started by a loop in
    a daemon thread used to run torch ops during finalization (an abort, rarely)."""
    script = textwrap.dedent(f"""
        import threading, anyio, torch, aioti
        from aioti.runtime import lifecycle
        from aioti.testing import eager_model
        entered, release, order = threading.Event(), threading.Event(), []
        class Slow(dict):
            def items(self):
                entered.set()
                release.wait(10)
                order.append("operation done")
                return super().items()
        async def main():
            async with aioti.load({str(models["small_mlp"])!r}) as model:
                sd = eager_model("small_mlp").state_dict()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(model.update_constants, Slow(sd))
                    await anyio.to_thread.run_sync(entered.wait)
                    hook = threading.Thread(target=lambda: (lifecycle._stop_all_at_exit(),
                                                            order.append("exit hook done")))
                    hook.start()
                    hook.join(0.3)
                    order.append("hook waiting" if hook.is_alive() else "hook did not wait")
                    release.set()
                    await anyio.to_thread.run_sync(hook.join)
                try:
                    await model.update_constants(sd)
                except aioti.ClosedError as exc:
                    order.append("refused: " + str(exc))
                try:
                    with lifecycle.operation():
                        order.append("started")
                except aioti.ClosedError as exc:
                    order.append("refused: " + str(exc))
        anyio.run(main)
        print(order)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("['hook waiting', 'operation done', 'exit hook done', 'refused: the model is closed', "
            "'refused: the interpreter is exiting") in proc.stdout, proc.stdout


async def test_load_from_bytes_and_binary_file_objects(models, tmp_path):
    """As torch's loader: the package's bytes, a BytesIO or an open file load like its path
    (written once into the cache under their hash); anything else is a ModelLoadError."""
    import io

    data = open(models["small_mlp"], "rb").read()
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = eager_model("small_mlp")(x)
    with open(models["small_mlp"], "rb") as f:
        for source in (data, io.BytesIO(data), f):
            async with aioti.load(source, cache_dir=tmp_path) as model:
                assert torch.allclose(await model(x), ref, atol=1e-5)
    assert len(list((tmp_path / "bytes").glob("*.pt2"))) == 1  # one copy, by content
    with pytest.raises(aioti.ModelLoadError, match="a path, bytes or a binary file object, "
                                                   "got int"):
        await aioti.load(42)
    with open(models["small_mlp"], errors="ignore") as text, \
            pytest.raises(aioti.ModelLoadError, match="binary mode"):
        await aioti.load(text, cache_dir=tmp_path)


async def test_a_lone_request_to_an_idle_fast_model_runs_on_the_callers_thread(models,
                                                                               monkeypatch):
    """A small CPU model, idle, its runs measured short: a lone request runs on the caller's
    thread (no hand-off to a worker), and the caller still yields to the loop's other tasks;
    under load, requests go to the worker; a slow model never runs on the loop. (The bound on
    a run's time is lifted here: on a loaded machine a run of this model can take longer.)"""
    from aioti.runtime import dispatch

    monkeypatch.setattr(dispatch, "IDLE_RUN_MAX_S", 1.0)
    x = torch.randn(2, 64)
    async with aioti.load(models["small_mlp"]) as model:
        threads = record_run_threads(model)
        for _ in range(5):  # the worker measures the model's runs first
            await model(x)
        threads.clear()
        seen: list[tuple[list[float], list[float]]] = []
        model.observe(lambda latencies, waits: seen.append((latencies, waits)))
        others = 0
        done = False

        async def other_task() -> None:
            nonlocal others
            while not done:
                others += 1
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(other_task)
            for _ in range(50):
                out = await model(x)
            done = True
        with torch.no_grad():
            assert torch.allclose(out, eager_model("small_mlp")(x), atol=1e-5)
        assert set(threads) == {threading.get_ident()} and len(threads) == 50
        assert others >= 25  # the loop's other task ran between the requests
        # each lone run is observed as a batch of one: its latency, and its wait within it
        assert len(seen) == 50, len(seen)
        assert all(len(lat) == len(wait) == 1 and 0 <= wait[0] <= lat[0] for lat, wait in seen)
        threads.clear()
        async with anyio.create_task_group() as tg:
            for _ in range(64):
                tg.start_soon(model, x)
        assert any(t != threading.get_ident() for t in threads)  # the worker took the load
        assert model.stats()["completed"] == 5 + 50 + 64
    async with aioti.load(models["mid_mlp"]) as slow:
        assert not slow._idle_on_loop  # its runs use every core: never on the loop's thread


async def test_a_request_much_bigger_than_the_recent_ones_goes_to_a_worker(models, monkeypatch):
    """The time of a lone run on the caller's thread is expected from the recent runs' time per
    row: after runs of one row, measured short, a request of 1024 rows is not run on the loop
    (its run would hold it some hundred times longer), and the next small one is again."""
    from aioti.runtime import dispatch

    small, big = torch.randn(1, 64), torch.randn(1024, 64)
    async with aioti.load(models["small_mlp"]) as model:
        for _ in range(10):
            await model(small)
        runner = model._dispatcher.runner
        # The bound at 32 rows' worth, whatever this machine's speed: a row runs well under it.
        monkeypatch.setattr(dispatch, "IDLE_RUN_MAX_S", runner.per_row_s * 32)
        threads = record_run_threads(model)
        await model(small)
        out = await model(big)
        await model(small)
        here = threading.get_ident()
        assert threads[0] == here and threads[1] != here and threads[2] == here
        with torch.no_grad():
            assert torch.allclose(out, eager_model("small_mlp")(big), atol=1e-5)

