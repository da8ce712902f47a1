"""The backend registry and the CUDA backend (skipped without a GPU)."""

from __future__ import annotations

import ctypes
import sys
import textwrap
import threading

import anyio
import pytest
import torch
from load import record_run_threads

import aioti
from aioti.backends import registry
from aioti.backends.cpu import CpuBackend
from aioti.core.threads import (
    ThreadTeams,
    set_thread_team_size,
    team_of_one,
    thread_team_size,
)
from aioti.testing import eager_model

pytestmark = pytest.mark.anyio
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


async def test_builtins_and_resolve():
    assert {"cpu", "cuda"} <= set(aioti.backends())
    cpu = await aioti.resolve_backend("cpu")
    assert cpu is await aioti.resolve_backend(torch.device("cpu"))
    with pytest.raises(aioti.BackendError, match="no backend for device type 'meta'"):
        await aioti.resolve_backend("meta")
    with pytest.raises(aioti.BackendError, match="not a device"):
        await aioti.resolve_backend("gpu!")
    if not torch.cuda.is_available():
        with pytest.raises(aioti.BackendError, match="CUDA is not available"):
            await aioti.resolve_backend("cuda:1")


async def test_register_and_concurrent_resolve_initializes_once():
    calls = []

    async def factory(device):
        calls.append(device)
        await anyio.sleep(0.01)
        return aioti.Backend(device)

    aioti.register_backend("privateuseone", factory, replace=True)
    with pytest.raises(aioti.BackendError, match="already registered"):
        aioti.register_backend("privateuseone", factory)
    got = []
    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(lambda: _append(got, aioti.resolve_backend("privateuseone:0")))
    assert len(calls) == 1 and len(got) == 100 and len({id(b) for b in got}) == 1
    aioti.register_backend("privateuseone", lambda d: 42, replace=True)
    with pytest.raises(aioti.BackendError, match="not a Backend"):
        await aioti.resolve_backend("privateuseone:0")


async def _append(out, coro):
    out.append(await coro)


async def _call_all(model, xs: list[torch.Tensor], rounds: int = 1) -> dict[int, torch.Tensor]:
    """Every input as its own concurrent caller, `rounds` times; the last round's outputs."""
    results: dict[int, torch.Tensor] = {}

    async def call(i: int) -> None:
        results[i] = await model(xs[i])

    for _ in range(rounds):
        async with anyio.create_task_group() as tg:
            for i in range(len(xs)):
                tg.start_soon(call, i)
    return results


def test_entry_point_plugins(tmp_path, monkeypatch):
    dist = tmp_path / "fakeplug-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[aioti.backends]\nhpu = fakeplug_mod:factory\nipu = missing_module:factory\n")
    (tmp_path / "fakeplug_mod.py").write_text(textwrap.dedent("""
        import aioti
        def factory(device):
            return aioti.Backend(device)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert "hpu" in aioti.backends() and "ipu" not in aioti.backends()

    async def main():
        assert isinstance(await aioti.resolve_backend("hpu"), aioti.Backend)
        with pytest.raises(aioti.BackendError, match="missing_module"):
            await aioti.resolve_backend("ipu")
        assert await aioti.resolve_backend("cpu")

    anyio.run(main)
    for name in ("hpu", "ipu"):
        registry._factories.pop(name, None)
        registry._broken.pop(name, None)
    sys.modules.pop("fakeplug_mod", None)


async def test_custom_backend_example(models):
    sys.path.insert(0, "examples")
    try:
        import custom_backend
    finally:
        sys.path.remove("examples")
    out = await custom_backend.main(models["small_mlp"])
    assert out["runs"] == 4 and out["finished_batches"] >= 1


@cuda
async def test_cuda_matches_eager(models):
    from aioti.testing import compile_model

    path = compile_model("small_mlp", "cuda")
    x = torch.randn(8, 64, device="cuda")
    async with aioti.load(path, device="cuda") as model:
        assert model.workers == 3
        out = await model(x)
        assert out.device.type == "cuda"
        assert torch.allclose(out, eager_model("small_mlp", "cuda")(x), atol=1e-4)
        with pytest.raises(aioti.InputError, match="cuda"):
            await model(x.cpu())
    async with aioti.load(path, device="cuda", move_inputs=True) as model:
        assert torch.allclose(await model(x.cpu()), eager_model("small_mlp", "cuda")(x), atol=1e-4)


@cuda
async def test_cuda_inputs_from_caller_stream_and_constants(models):
    from aioti.testing import compile_model

    path = compile_model("small_mlp", "cuda")
    eager = eager_model("small_mlp", "cuda")
    async with aioti.load(path, device="cuda") as model:
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            x = torch.randn(64, 64, device="cuda") * 3  # produced asynchronously on s
            outs = [model(x) for _ in range(8)]
            results = [await o for o in outs]
            # Still being written on s when the worker takes it (s sleeps first on the GPU):
            # its stream must wait for s, or it reads the new tensor's memory before it is set.
            late = torch.empty(64, 64, device="cuda")
            torch.cuda._sleep(50_000_000)
            late.copy_(x * -1)
            late_out = await model(late)
        ref = eager(x)
        assert all(torch.allclose(r, ref, atol=1e-4) for r in results)
        assert torch.allclose(late_out, eager(-x), atol=1e-4)
        sd = {k: v.cpu() + 0.5 for k, v in eager.state_dict().items()}
        await model.hot_swap(sd)  # CPU tensors copied to the device
        eager.load_state_dict(sd)
        assert torch.allclose(await model(x), eager(x), atol=1e-4)


@cuda
async def test_a_lone_request_to_an_idle_cuda_model_runs_on_the_callers_thread(models):
    """An idle CUDA model whose runs (launch to outputs ready) are measured short: a lone
    request runs on the caller's thread, on the caller's own stream, leaves the caller's current
    stream as it was, and gives outputs ready on any stream (not only the caller's). One whose
    caller's stream still has work queued (its inputs being written) goes to a worker, which
    waits for that work on the GPU: on the caller's thread the loop would wait for it. Under
    load the workers take over."""
    from aioti.testing import compile_model

    path = compile_model("small_mlp", "cuda")
    eager = eager_model("small_mlp", "cuda")
    async with aioti.load(path, device="cuda") as model:
        runner = model._dispatcher.runner
        threads = record_run_threads(model)
        streams: list[int | None] = []
        recording = runner._executor._run_many

        def stream_recording(batch, stream):
            streams.append(stream)
            return recording(batch, stream)

        runner._executor._run_many = stream_recording
        x = torch.randn(8, 64, device="cuda")
        for _ in range(20):  # the workers measure the model's runs first
            await model(x)
        assert runner.per_row_s < aioti.runtime.dispatch.IDLE_RUN_MAX_S, runner.per_row_s
        threads.clear()
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            y = x * -1
            s.synchronize()  # nothing left queued on the caller's stream
            out = await model(y)
            assert torch.cuda.current_stream() == s  # the caller's stream, as it was
            other = torch.cuda.Stream()
            with torch.cuda.stream(other):  # ready there too, without waiting for s
                from_other = out.clone()
        assert threads == [threading.get_ident()]  # ran here
        assert streams[-1] == s.cuda_stream  # launched on the caller's stream
        assert torch.allclose(out, eager(-x), atol=1e-4)
        other.synchronize()
        assert torch.equal(from_other, out)
        threads.clear()
        with torch.cuda.stream(s):
            late = torch.empty(8, 64, device="cuda")
            torch.cuda._sleep(50_000_000)  # the caller's stream is busy for a while
            late.copy_(x * 2)
            out = await model(late)
        assert threads and threading.get_ident() not in threads  # a worker ran it
        assert torch.allclose(out, eager(2 * x), atol=1e-4)
        outs = [o for o in [await model(x) for _ in range(10)]]
        assert all(torch.allclose(o, eager(x), atol=1e-4) for o in outs)
        threads.clear()
        async with anyio.create_task_group() as tg:
            for _ in range(64):
                tg.start_soon(model, x)
        assert any(t != threading.get_ident() for t in threads)  # the workers took the load


async def test_cpu_workers_run_with_their_own_team_size(models, cpu_backend):
    try:
        omp_get_max_threads = ctypes.CDLL(None).omp_get_max_threads
    except AttributeError:
        pytest.skip("no OpenMP runtime in this process")
    here = omp_get_max_threads()
    seen = []

    class Recording(CpuBackend):
        def begin_batch(self, ctx, readies):
            seen.append(omp_get_max_threads())  # in the worker, after aioti set the team size
            return super().begin_batch(ctx, readies)

    cpu_backend(Recording)
    x = torch.randn(3, 64)
    async with aioti.load(models["small_mlp"]) as model:
        assert (model.threads.alone, model.threads.shared) == (1, 1)  # small: no team
        assert torch.equal(await model(x), eager_model("small_mlp")(x))
    async with aioti.load(models["small_mlp"], workers=2, threads=2) as model:
        assert (model.threads.alone, model.threads.shared) == (2, 2)
        await model(x)
    async with aioti.load(models["mid_mlp"], workers=2) as model:
        cores = torch.get_num_threads()
        assert (model.threads.alone, model.threads.shared) == (cores, max(1, cores // 2))
        await model(torch.randn(2, 1024))  # alone: the whole machine
    with pytest.raises(ValueError, match="threads must be >= 1, got 0"):
        await aioti.load(models["small_mlp"], threads=0)
    assert seen == [1, 2, torch.get_num_threads()]
    assert omp_get_max_threads() == here  # the caller's threads are left alone


def test_team_size_per_batch():
    """The lead worker's team is the whole machine while its batch runs alone, the shared size
    while others run; every other thread's is `others`; sizes are only set when they change,
    and a borrowed thread (an event loop's) gets its own size back."""
    try:
        omp_get_max_threads = ctypes.CDLL(None).omp_get_max_threads
    except AttributeError:
        pytest.skip("no OpenMP runtime in this process")
    teams = ThreadTeams(alone=3, shared=2, others=1)
    seen: dict[bool, list[int]] = {True: [], False: []}

    def worker(lead):
        teams.enter(lead)
        for running in (1, 2, 2, 1, 3):
            teams.before_batch(running)
            seen[lead].append(omp_get_max_threads())

    for lead in (True, False):
        t = threading.Thread(target=worker, args=(lead,))
        t.start()
        t.join(30)
    assert seen == {True: [3, 2, 2, 3, 2], False: [1, 1, 1, 1, 1]}

    def borrowed():
        torch.get_num_threads()  # torch's own setting of the thread first, as on a loop's
        set_thread_team_size(4)
        own = teams.borrow()
        seen[False].append(omp_get_max_threads())
        teams.give_back(own)
        seen[False].append(omp_get_max_threads())

    t = threading.Thread(target=borrowed)
    t.start()
    t.join(30)
    assert seen[False][-2:] == [1, 4]
    with pytest.raises(ValueError, match="threads must be >= 1"):
        ThreadTeams(0, 1)


def test_size_tuner_runs_the_faster_size_and_probes_the_other():
    """Each size FIRST_RUN batches at first; then the faster by mean time per request, the
    other probed for PROBE_RUN batches, PROBE_FIRST batches after a probe that changed the
    choice and twice as long after each that did not (up to PROBE_MAX); a rise of the
    running size's own measure switches at once, and the other is probed again within
    PROBE_FIRST batches."""
    from aioti.core.threads import FIRST_RUN, PROBE_FIRST, PROBE_MAX, PROBE_RUN, SizeTuner

    tuner = SizeTuner((4, 2))
    picks: list[int] = []

    def serve(cost: tuple[float, float], batches: int) -> None:
        for _ in range(batches):
            i = tuner.pick()
            picks.append(i)
            tuner.record(i, cost[i] * 8, 8)  # 8 requests at cost[i] s each

    serve((2e-3, 1e-3), 2 * FIRST_RUN + 2000)
    assert picks[:2 * FIRST_RUN] == [0] * FIRST_RUN + [1] * FIRST_RUN
    assert tuner.best == 1 and tuner.costs == pytest.approx([2e-3, 1e-3])
    # where each probe of size 4 begins, after the first turns (size 2 is faster)
    starts = [k for k in range(2 * FIRST_RUN, len(picks)) if picks[k - 1:k + 1] == [1, 0]]
    assert all(picks[k:k + PROBE_RUN + 1] == [0] * PROBE_RUN + [1] for k in starts)
    gaps = [b - a - PROBE_RUN for a, b in zip(starts, starts[1:])]
    assert starts[0] == 2 * FIRST_RUN + PROBE_FIRST
    assert gaps[:4] == [2 * PROBE_FIRST, 4 * PROBE_FIRST, 8 * PROBE_FIRST, 16 * PROBE_FIRST]
    assert max(gaps) == PROBE_MAX  # doubling stops there
    picks.clear()
    serve((0.5e-3, 1e-3), PROBE_MAX + 2 * PROBE_RUN)  # the larger team got faster: a probe sees
    assert tuner.best == 0 and picks[-1] == 0
    picks.clear()
    serve((3e-3, 1e-3), 10)  # and slower again: its own measure switches back at once
    assert tuner.best == 1 and picks[-1] == 1 and picks.count(0) < 8
    # ... and the size left behind is probed again soon, though the last probe was just made
    # and the probes had grown PROBE_MAX apart
    tuner, picks = SizeTuner((4, 2)), []
    serve((1e-3, 2e-3), 2 * FIRST_RUN + 4 * PROBE_MAX)
    while picks[-PROBE_RUN - 1:] != [1] * PROBE_RUN + [0]:
        serve((1e-3, 2e-3), 1)
    picks.clear()
    serve((3e-3, 1e-3), PROBE_FIRST + 2 * PROBE_RUN)
    first = picks.index(1)
    assert picks[first + 1:].index(0) <= PROBE_FIRST


def test_the_leads_size_alone_is_tuned_and_timed_only_when_warm():
    """Only the lead's batches alone are tuned; the first batch after a change of the
    thread's size is not timed (its team wakes); without `tune`, or with one thread alone,
    there is no tuner."""
    if thread_team_size() is None:
        pytest.skip("no OpenMP runtime in this process")
    teams = ThreadTeams(alone=4, shared=2, others=1, tune=True)
    assert teams.choices == (4, 2) and teams.tuner is not None
    got: list[tuple[int | None, int | None]] = []

    def lead() -> None:
        teams.enter(True)
        for busy in (1, 1, 2, 1, 1):
            got.append((teams.before_batch(busy), thread_team_size()))

    def other() -> None:
        teams.enter(False)
        got.append((teams.before_batch(1), thread_team_size()))

    for target in (lead, other):
        t = threading.Thread(target=target)
        t.start()
        t.join(30)
    # size 4 (untimed: the thread's size changed), 4 timed, beside another: 2 untimed, then 4
    # again (untimed), 4 timed; another thread: 1, untimed
    assert got == [(None, 4), (0, 4), (None, 2), (None, 4), (0, 4), (None, 1)]
    assert ThreadTeams(alone=4, shared=2, others=1).tuner is None
    assert ThreadTeams(alone=1, shared=1, tune=True).choices == (1,)


async def test_a_cpu_models_lead_team_is_tuned_unless_threads_are_given(models):
    """A model with a team measures both of its lead's sizes as it serves (model.stats()
    says them); `threads=N` fixes N, untuned."""
    cores = torch.get_num_threads()
    if cores < 2:
        pytest.skip("one core: no team to tune")
    x = torch.randn(2, 1024)
    from aioti.core.threads import FIRST_RUN

    async with aioti.load(models["mid_mlp"], workers=1) as model:
        for _ in range(2 * FIRST_RUN + 4):  # each size's turn
            await model(x)
        threads = model.stats()["threads"]
        assert threads["alone_choices"] == [cores, cores // 2]
        assert threads["alone"] in threads["alone_choices"]
        assert all(c > 0 for c in model.threads.tuner.costs)  # both measured
    async with aioti.load(models["mid_mlp"], workers=1, threads=2) as model:
        await model(x)
        assert model.stats()["threads"]["alone_choices"] == [2]


def test_team_of_one_sizes_a_helper_thread_for_its_work_only():
    """A load's or a constant operation's thread forks no team while it works, and has its own
    size back afterwards."""
    if thread_team_size() is None:
        pytest.skip("no OpenMP runtime in this process")
    seen = []

    def helper():
        torch.get_num_threads()  # torch's own setting of the thread first
        set_thread_team_size(3)
        with team_of_one():
            seen.append(thread_team_size())
        seen.append(thread_team_size())

    t = threading.Thread(target=helper)
    t.start()
    t.join(30)
    assert seen == [1, 3]


def test_cpu_team_size_policy():
    """Only the lead worker forks a team: of the cores the other workers leave it, a fixed
    size where that is more than one core (resizing makes and ends threads); where it is one,
    every core for a batch alone. Small models: one thread everywhere."""
    cpu = CpuBackend(torch.device("cpu"))
    for cores, workers, policy in ((2, 1, (2, 2, 1)), (2, 2, (2, 1, 1)), (8, 2, (7, 7, 1)),
                                   (8, 64, (8, 1, 1)), (1, 2, (1, 1, 1))):
        cpu.cores = cores
        assert cpu.worker_threads(1 << 30, workers) == policy, (cores, workers)
    assert cpu.worker_threads(1000, 1) == (1, 1, 1)


class DeferredBackend(CpuBackend):
    """A CPU backend whose batches report ready only after a few polls, as a GPU's do: it
    drives the worker's in-flight path (launch on, deliver once ready) without a GPU."""

    max_in_flight = 2

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.tokens: list[list[int]] = []
        self.waited = 0

    def finish(self, ctx):
        token = [3]  # polls left before it reports ready
        self.tokens.append(token)
        return token

    def ready(self, token) -> bool:
        token[0] -= 1
        return token[0] <= 0

    def wait_ready(self, token) -> None:
        self.waited += 1
        token[0] = 0


async def test_batches_in_flight_are_delivered_once_ready(models, cpu_backend):
    """Results of batches whose readiness comes later reach the right callers; mutations wait
    for in-flight batches; closing lands them."""
    cpu_backend(DeferredBackend)
    eager = eager_model("small_mlp")
    xs = [torch.randn(1 + i % 5, 64) for i in range(200)]
    async with aioti.load(models["small_mlp"], workers=2) as model:
        backend = model.backend
        assert isinstance(backend, DeferredBackend)
        results: dict[int, torch.Tensor] = {}

        async def call(i: int) -> None:
            results[i] = await model(xs[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(xs)):
                tg.start_soon(call, i)
            tg.start_soon(model.hot_swap, eager.state_dict())  # waits for in-flight ones
        with torch.no_grad():
            assert all(torch.allclose(results[i], eager(x), atol=1e-5)
                       for i, x in enumerate(xs))
        assert all(t[0] <= 0 for t in backend.tokens)  # none delivered before ready
        assert backend.waited >= 1 and len(backend.tokens) >= 2
        served = []

        async def late(x: torch.Tensor) -> None:
            try:
                served.append(await model(x))
            except aioti.ClosedError:  # not queued before the close began
                pass

        async with anyio.create_task_group() as tg:
            for x in xs[:20]:
                tg.start_soon(late, x)
            with anyio.fail_after(10):
                while not served:
                    await anyio.sleep(0)
            await model.aclose()  # lands what is in flight, then closes
    assert all(t[0] <= 0 for t in backend.tokens)
    assert model.stats()["completed"] == 200 + len(served)


@cuda
async def test_cuda_one_stream_many_callers(models):
    """One worker stream, 128 callers with distinct inputs: each gets its own outputs (batches
    stay in flight on the stream while the worker launches the next)."""
    from aioti.testing import compile_model

    path = compile_model("small_mlp", "cuda")
    eager = eager_model("small_mlp", "cuda")
    xs = [torch.randn(1 + i % 3, 64, device="cuda") for i in range(128)]
    async with aioti.load(path, device="cuda", workers=1) as model:
        for _ in range(3):
            results = await _call_all(model, xs)
            with torch.no_grad():
                assert all(torch.allclose(results[i], eager(x), atol=1e-4)
                           for i, x in enumerate(xs))


def test_cuda_driver_missing_is_a_backend_error():
    from aioti.backends.cuda_driver import driver

    with pytest.raises(aioti.BackendError, match="driver library could not be bound: "
                                                 "libaioti-missing.so.1"):
        driver("libaioti-missing.so.1")


@cuda
def test_cuda_driver_events_and_stream_checks():
    """The GIL-held driver calls the CUDA worker makes: an event recorded behind GPU work is not
    reached until the work is done; a stream with work queued is not idle."""
    from aioti.backends.cuda_driver import driver

    d = driver()
    s = torch.cuda.Stream()
    event = d.create_event()
    try:
        assert d.query(event)  # never recorded: reached
        with torch.cuda.stream(s):
            torch.cuda._sleep(50_000_000)
        d.record(event, s.cuda_stream)
        assert not d.query(event) and not d.idle(s.cuda_stream)
        d.synchronize(event)
        assert d.query(event) and d.idle(s.cuda_stream)
    finally:
        d.destroy_event(event)
    with pytest.raises(aioti.BackendError, match=r"cuEventRecord failed: CUDA_ERROR_INVALID_VALUE \(code 1\)"):
        d._check(1, "cuEventRecord")  # how a failed call reads


class LostBatchBackend(CpuBackend):
    """A backend whose first batch's readiness check fails, as a device error would."""

    max_in_flight = 1

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.batches = 0

    def finish(self, ctx):
        self.batches += 1
        return self.batches

    def ready(self, token) -> bool:
        if token == 1:
            raise RuntimeError("device lost during batch 1")
        return True

    def wait_ready(self, token) -> None:
        self.ready(token)


class FirstBatchFailsBackend(CpuBackend):
    """A backend that fails to prepare its first batch, as a lost stream would."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.batches = 0

    def begin_batch(self, ctx, readies):
        self.batches += 1
        if self.batches == 1:
            raise RuntimeError("stream lost before batch 1")
        return super().begin_batch(ctx, readies)


@pytest.mark.parametrize(("backend", "message", "batching"), [
    (LostBatchBackend, "device lost during batch 1", None),
    (FirstBatchFailsBackend, "stream lost before batch 1", aioti.Batching(8, 1)),
    (FirstBatchFailsBackend, "stream lost before batch 1", aioti.Batching(8, 1, on_loop=True)),
], ids=["readiness", "before batch, worker", "before batch, on_loop"])
async def test_a_backend_error_fails_that_batch_only(models, cpu_backend, backend, message, batching):
    """An error from the backend (a failed readiness check, or one escaping the batch before
    its runs) reaches that batch's callers only; the model keeps serving, and closes (its
    running count was settled)."""
    cpu_backend(backend)
    x = torch.randn(2, 64)
    with anyio.fail_after(20):
        async with aioti.load(models["small_mlp"], batching=batching) as model:
            with pytest.raises(RuntimeError, match=message):
                await model(x)
            with torch.no_grad():
                assert torch.allclose(await model(x), eager_model("small_mlp")(x), atol=1e-5)
            assert model.stats()["failed"] == 1 and model.stats()["completed"] == 1


@pytest.mark.parametrize("on_loop", [False, True], ids=["worker", "on_loop"])
async def test_batching_with_batches_in_flight(models, cpu_backend, on_loop):
    """Dynamic batching over a backend whose batches finish later: merged runs stay in flight
    while the next batch fills (on the loop: each is waited for at once), and every caller
    gets its own rows."""
    cpu_backend(DeferredBackend)
    eager = eager_model("small_mlp")
    xs = [torch.randn(1 + i % 4, 64) for i in range(150)]
    cfg = aioti.Batching(max_batch_size=16, max_delay_ms=1.0, on_loop=on_loop)
    async with aioti.load(models["small_mlp"], batching=cfg) as model:
        results = await _call_all(model, xs, rounds=2)
        with torch.no_grad():
            assert all(results[i].shape == (x.shape[0], 10)
                       and torch.allclose(results[i], eager(x), atol=1e-5)
                       for i, x in enumerate(xs))
        assert max(model.stats()["batching"]["batch_rows"]) <= 16
        assert all(t[0] <= 0 for t in model.backend.tokens) and len(model.backend.tokens) > 2
