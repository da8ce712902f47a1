"""A replica pool on two CPU replicas (as CI runs it): outputs, routing, hot swaps across
replicas, a staging failure, a failing replica, closing; the multi-GPU case skips with fewer
than two GPUs."""

from __future__ import annotations

import time

import anyio
import pytest
import torch
from load import FlakyCpuBackend, break_workers, call_from_three_loops, load_until_unhealthy

import aioti
from aioti.backends.cpu import CpuBackend
from aioti.testing import eager_model

pytestmark = pytest.mark.anyio
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


class SlowCpuBackend(CpuBackend):
    """The CPU, 5 ms slower per batch: a replica on it should get less of the load."""

    def begin_batch(self, ctx, readies):
        time.sleep(0.005)
        return super().begin_batch(ctx, readies)


async def call_all(model, xs, rounds=1, callers=64):
    results = [None] * len(xs)

    async def caller(k):
        for _ in range(rounds):
            for i in range(k, len(xs), callers):
                results[i] = await model(xs[i])

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for k in range(callers):
                tg.start_soon(caller, k)
    return results


@pytest.mark.parametrize("batching", [None, aioti.Batching(16, 1.0)], ids=["plain", "batched"])
async def test_two_replicas_match_eager_and_both_serve(models, batching):
    eager = eager_model("small_mlp")
    xs = [torch.randn(1 + i % 4, 64) for i in range(640)]
    async with aioti.load(models["small_mlp"], device=["cpu", "cpu"], batching=batching) as model:
        assert isinstance(model, aioti.ReplicaPool) and len(model.replicas) == 2
        results = await call_all(model, xs, rounds=2)
        stats = model.stats()
    with torch.no_grad():
        assert all(torch.allclose(r, eager(x), atol=1e-5) for r, x in zip(results, xs))
    served = [r["completed"] for r in stats["replicas"]]
    assert min(served) > 0 and stats["completed"] == sum(served) == 1280
    assert stats["failed"] == 0 and all(r["healthy"] for r in stats["replicas"])


async def test_loops_in_threads_share_a_pool(models):
    """One pool awaited from this loop and from an asyncio and a trio loop in two other
    threads at once: every caller gets its own input's output, on its own loop, and both
    replicas serve."""
    eager = eager_model("small_mlp")
    async with aioti.load(models["small_mlp"], device=["cpu", "cpu"]) as model:
        results = await call_from_three_loops(model, eager, 16, lambda i: 1 + i % 3, 60)
        served = [r["completed"] for r in model.stats()["replicas"]]
    assert results == {"here": [True] * 320, "asyncio": [True] * 320, "trio": [True] * 320}
    assert min(served) > 0 and sum(served) == 960


async def test_a_lone_request_runs_on_the_callers_thread(models):
    """At concurrency 1 a pool runs a request on its caller's thread with the chosen replica's
    lead, as a single model does (no hand-off to a worker and back); concurrent callers still
    go to the replicas' workers."""
    eager = eager_model("small_mlp")
    xs = [torch.randn(1 + i % 3, 64) for i in range(64)]
    async with aioti.load(models["small_mlp"], device=["cpu", "cpu"], threads=1) as model:
        lone = [await model(x) for x in xs for _ in range(10)]
        ran_here = model.stats()["ran_on_caller_thread"]
        together = await call_all(model, xs, rounds=4)
        stats = model.stats()
    with torch.no_grad():
        want = [eager(x) for x in xs]
    assert all(torch.allclose(r, w, atol=1e-5) for r, w in zip(lone[::10], want))
    assert all(torch.allclose(r, w, atol=1e-5) for r, w in zip(together, want))
    assert ran_here > 300  # the first runs, timed on the workers, decide; then most run here
    assert stats["completed"] == 640 + 256 and stats["ran_on_caller_thread"] < 640 + 256 - 128


async def test_a_lone_request_on_a_failing_replica_goes_to_another(models, other_backend):
    """A lone request runs on its caller's thread with the replica the router picked; when that
    replica's backend step fails before the run, the request runs on the other replica (its
    caller gets its outputs) and the failing one is taken out."""
    other_backend(FlakyCpuBackend)  # replica 0's; replica 1 is on the plain CPU backend
    eager = eager_model("small_mlp")
    xs = [torch.randn(1 + i % 3, 64) for i in range(64)]
    try:
        async with aioti.load(models["small_mlp"], device=["privateuseone:0", "cpu"],
                              threads=1) as model:
            await call_all(model, xs)  # both replicas run, and time their runs
            model.router._last = 0  # lone requests go to replica 0 (ties go to the last one)
            for x in xs:
                await model(x)
            before = model.stats()["replicas"][0]["ran_on_caller_thread"]
            assert before > 0
            FlakyCpuBackend.broken.set()
            got = [await model(x) for x in xs]
            stats = model.stats()
    finally:
        FlakyCpuBackend.broken.clear()
    with torch.no_grad():
        assert all(torch.allclose(r, eager(x), atol=1e-5) for r, x in zip(got, xs))
    broken, other = stats["replicas"]
    assert broken["ran_on_caller_thread"] == before + 1  # the lone run that failed
    assert not broken["healthy"] and "device lost" in broken["fault"]
    assert other["healthy"] and other["completed"] >= 64 and stats["failed"] == 0


async def test_callers_waiting_for_room_are_woken(models):
    """max_queue 4 per replica under 64 callers that wait for room: a worker taking a batch
    wakes the callers parked in the pool's lot (before, each queue had a lot of its own, and
    every caller that parked waited forever: found by `make chaos`)."""
    eager = eager_model("small_mlp")
    x = torch.randn(1, 64)
    done = 0
    async with aioti.load(models["small_mlp"], device=["cpu", "cpu"], max_queue=4,
                          on_full="wait") as model:

        async def caller() -> None:
            nonlocal done
            for _ in range(50):
                assert torch.allclose(await model(x), eager(x), atol=1e-5)
                done += 1
                await anyio.sleep(0)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(64):
                    tg.start_soon(caller)
        stats = model.stats()
    assert done == 64 * 50 and stats["completed"] == 64 * 50


async def test_a_slow_replica_gets_less(models, other_backend):
    other_backend(SlowCpuBackend)
    xs = [torch.randn(2, 64) for _ in range(64)]
    async with aioti.load(models["small_mlp"], device=["cpu", "privateuseone:0"]) as model:
        await call_all(model, xs, rounds=20)
        fast, slow = (r["completed"] for r in model.stats()["replicas"])
    assert slow > 0 and fast > 1.5 * slow


async def test_hot_swap_under_load_is_never_torn_across_replicas(models):
    a, b = eager_model("small_mlp"), eager_model("small_mlp")
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(-0.5)
    x = torch.randn(2, 64)
    refs = [a(x).detach(), b(x).detach()]
    outs: list[torch.Tensor] = []
    done = False
    async with aioti.load(models["small_mlp"], device=["cpu", "cpu"]) as model:

        async def caller():
            while not done:
                outs.append(await model(x))

        async with anyio.create_task_group() as tg:
            for _ in range(32):
                tg.start_soon(caller)
            for i in range(20):
                await model.hot_swap((b if i % 2 == 0 else a).state_dict())
                await anyio.sleep(0.001)
            done = True
        # 20 swaps: back on a's weights; every replica serves them now
        after = await call_all(model, [x] * 64)
        served = [r["completed"] for r in model.stats()["replicas"]]
    torn = [o for o in outs if not any(torch.allclose(o, r, atol=1e-5) for r in refs)]
    assert not torn and len(outs) > 100 and min(served) > 0
    assert all(torch.allclose(o, refs[0], atol=1e-5) for o in after)


async def test_a_staging_failure_on_one_replica_swaps_nothing(models):
    a, b = eager_model("small_mlp"), eager_model("small_mlp")
    with torch.no_grad():
        for p in b.parameters():
            p.add_(1.0)
    x = torch.randn(3, 64)
    async with aioti.load(models["small_mlp"], device=["cpu", "cpu"]) as model:
        second = model.replicas[1].container.buffers

        def refuse(mapping):
            raise aioti.InputError("no room for these weights")

        second.stage_constants = refuse
        with pytest.raises(aioti.InputError, match=r"replica 1 \(cpu\): no room.*no replica"):
            await model.hot_swap(b.state_dict())
        outs = await call_all(model, [x] * 64)
        del second.stage_constants
        await model.hot_swap(b.state_dict())  # works again
        swapped = await call_all(model, [x] * 64)
    with torch.no_grad():
        assert all(torch.allclose(o, a(x), atol=1e-5) for o in outs)
        assert all(torch.allclose(o, b(x), atol=1e-5) for o in swapped)


async def test_a_failing_replica_is_taken_out_and_the_rest_serve(models, other_backend):
    """While replica 1's device fails every batch, requests that had not started there go to
    replica 0: every caller gets its outputs. check_health puts it back once it recovers."""
    other_backend(FlakyCpuBackend)
    FlakyCpuBackend.broken.set()
    eager = eager_model("small_mlp")
    xs = [torch.randn(1 + i % 3, 64) for i in range(256)]
    try:
        async with aioti.load(models["small_mlp"], device=["cpu", "privateuseone:0"]) as model:
            results = await call_all(model, xs)
            stats = model.stats()
            assert [r["healthy"] for r in stats["replicas"]] == [True, False]
            assert "device lost" in stats["replicas"][1]["fault"]
            assert await model.check_health() == [True, False]  # still broken
            FlakyCpuBackend.broken.clear()
            assert await model.check_health() == [True, True]
            await call_all(model, xs, rounds=4)
            after = model.stats()["replicas"]
    finally:
        FlakyCpuBackend.broken.clear()
    with torch.no_grad():
        assert all(torch.allclose(r, eager(x), atol=1e-5) for r, x in zip(results, xs))
    assert stats["failed"] == 0 and stats["completed"] == 256
    assert after[1]["completed"] > 0  # back in routing


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_replica_whose_worker_fails_stays_out_and_the_rest_serve(models, caplog,
                                                                        workers):
    """A failure of the runtime in a worker thread (injected into replica 0's queue; with two
    workers, into its worker 0's takes only) stops that replica only: it is logged and marked
    unhealthy, stays so under `check_health` (its workers are gone: one that outlived the
    failed one does not serve on), and every request is served by replica 1."""
    eager = eager_model("small_mlp")
    xs = [torch.randn(1 + i % 3, 64) for i in range(128)]
    async with aioti.load(models["small_mlp"], device=["cpu", "cpu"], workers=workers) as model:
        break_workers(model.replicas[0].dispatcher, index=0)
        # Replica 0's worker meets the fault at its next take, after a batch it already waits
        # for: load until it has (in its own thread, so not necessarily within the first load).
        outs = []
        with anyio.fail_after(60):
            while model.stats()["replicas"][0]["healthy"]:
                outs.append(await call_all(model, xs))
        assert await model.check_health() == [False, True]
        outs.append(await call_all(model, xs))
        stats = model.stats()
        assert "worker 0 failed" in (model.replicas[0].dispatcher.fault or "")  # it stopped
    with torch.no_grad():
        assert all(torch.allclose(r, eager(x), atol=1e-5) for results in outs
                   for r, x in zip(results, xs))
    assert stats["failed"] == 0 and [r["healthy"] for r in stats["replicas"]] == [False, True]
    assert "worker 0 failed (RuntimeError: injected into the queue)" in caplog.text


async def test_a_replica_that_refuses_while_still_routed_is_passed_over(models):
    """Between a replica's worker failing and the router taking it out, requests routed there
    are refused (`ClosedError`): the replica is taken out then, and they go to another, never
    to their callers; where no other may take them, the caller gets the refusal."""
    eager = eager_model("small_mlp")
    xs = [torch.randn(1 + i % 3, 64) for i in range(128)]
    async with aioti.load(models["small_mlp"], device=["cpu", "cpu"]) as model:
        queue = model.replicas[0].dispatcher.queue
        queue.closed_reason = "the model's worker 0 failed (RuntimeError: gone)"
        queue.closing = True  # as a failed replica's queue is, still healthy in routing
        results = await call_all(model, xs)
        stats = model.stats()["replicas"]
        assert [r["healthy"] for r in stats] == [False, True] and "gone" in stats[0]["fault"]
        assert stats[1]["completed"] == len(xs)
        model.replicas[1].dispatcher.queue.closing = True  # the last healthy one
        with pytest.raises(aioti.ClosedError, match="closed"):
            await model(xs[0])
        for q in (queue, model.replicas[1].dispatcher.queue):
            q.closing = False  # for the close at the end
    with torch.no_grad():
        assert all(torch.allclose(r, eager(x), atol=1e-5) for r, x in zip(results, xs))


async def test_a_pool_whose_replicas_all_failed_is_unhealthy_and_says_why(models):
    """When the workers of every replica fail, the last one stays in routing (there is nowhere
    else to go) but serves no more: the pool and each replica are unhealthy, the faults name
    both, later calls are refused with the cause."""
    async with aioti.load(models["small_mlp"], device=["cpu", "cpu"]) as model:
        assert model.healthy and await model.check_health() == [True, True]
        break_workers(*(r.dispatcher for r in model.replicas))
        await load_until_unhealthy(model, torch.randn(2, 64))
        stats = model.stats()
        assert sorted(model.router.healthy) == [False, True]  # the last is kept in routing
        assert await model.check_health() == [False, False] and not stats["healthy"]
        assert [r["healthy"] for r in stats["replicas"]] == [False, False]
        assert all("injected into the queue" in r["fault"] for r in stats["replicas"])
        assert "replica 0 (cpu)" in stats["fault"] and "replica 1 (cpu)" in stats["fault"]
        for call in (lambda: model(torch.randn(2, 64)), lambda: model.hot_swap({})):
            with pytest.raises(aioti.ClosedError, match="injected into the queue") as got:
                await call()
            assert "replica 0 (cpu)" in str(got.value) and "replica 1 (cpu)" in str(got.value)


async def test_a_pool_closed_after_a_replica_failed_says_it_was_closed(models):
    """A pool closed as asked refuses calls saying so, also after one of its replicas failed
    (before, with replica 0's failure: that replica's fault, as if it were the pool's)."""
    x = torch.randn(2, 64)
    async with aioti.load(models["small_mlp"], device=["cpu", "cpu"]) as model:
        break_workers(model.replicas[0].dispatcher)
        with anyio.fail_after(60):
            while model.stats()["replicas"][0]["healthy"]:
                await call_all(model, [x] * 16)
    for call in (lambda: model(x), lambda: model.hot_swap({})):
        with pytest.raises(aioti.ClosedError, match="^the model is closed$"):
            await call()


@pytest.mark.parametrize("broken", [0, 1])
async def test_constant_operations_leave_out_a_replica_whose_workers_failed(models, broken):
    """Weights keep changing on a pool that lost a replica for good (its workers failed, its
    native container is gone): hot swap, extract, update, swap back act on the replicas that
    serve. Before, with replica 0 lost every one raised its `ClosedError`; with replica 1 lost a
    hot swap failed naming it, and `swap_constants` swapped replica 0 before failing."""
    old, new = eager_model("small_mlp"), eager_model("small_mlp")
    with torch.no_grad():
        for p in new.parameters():
            p.mul_(-0.5)
    xs = [torch.randn(1 + i % 3, 64) for i in range(64)]
    async with aioti.load(models["small_mlp"], device=["cpu", "cpu"]) as model:
        break_workers(model.replicas[broken].dispatcher)
        with anyio.fail_after(60):
            while model.stats()["replicas"][broken]["healthy"]:
                await call_all(model, xs)
        assert model.healthy
        await model.hot_swap(new.state_dict())
        after_swap = await call_all(model, xs)
        readable = model.container.library.has("ExtractConstantsMapEntries")  # not torch 2.11
        extracted = await model.extract_constants(by_fqn=True) if readable else new.state_dict()
        await model.swap_constants()  # the rollback
        rolled_back = await call_all(model, xs)
        await model.update_constants(new.state_dict(), inactive=True)
        await model.swap_constants()
        updated = await call_all(model, xs)
    with torch.no_grad():
        for results, eager in ((after_swap, new), (rolled_back, old), (updated, new)):
            assert all(torch.allclose(r, eager(x), atol=1e-5) for r, x in zip(results, xs))
        assert all(torch.equal(extracted[k], v) for k, v in new.state_dict().items())


async def test_close_with_work_in_flight(models):
    x = torch.randn(64, 1024)
    model = await aioti.load(models["mid_mlp"], device=["cpu", "cpu"])
    # the cores are split between the replicas on the CPU (each replica's lead keeps a core for
    # every other worker of its own: the exact split depends on the machine's worker count)
    cores = torch.get_num_threads()
    teams = [r.threads.alone for r in model.replicas]
    assert all(1 <= t <= max(1, cores // 2) for t in teams), (teams, cores)
    got = []

    async def caller():
        try:
            got.append(await model(x))
        except aioti.ClosedError:
            got.append(None)

    async with anyio.create_task_group() as tg:
        for _ in range(32):
            tg.start_soon(caller)
        await anyio.sleep(0.01)
        with anyio.fail_after(60):
            await model.aclose()
    assert len(got) == 32 and all(g is None or g.shape == (64, 1024) for g in got)
    assert all(r.dispatcher.stopped for r in model.replicas)
    with pytest.raises(aioti.ClosedError):
        await model(x)


async def test_backpressure_is_the_pools(models):
    """Each replica holds 2 queued requests: a caller is refused only when both are full."""
    x = torch.randn(256, 1024)
    async with aioti.load(models["mid_mlp"], device=["cpu", "cpu"], workers=1, max_queue=2,
                          on_full="raise") as model:
        outcomes: list[str] = []

        async def caller():
            try:
                await model(x)
                outcomes.append("ok")
            except aioti.QueueFullError as exc:
                assert "every replica" in str(exc)
                outcomes.append("full")

        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(caller)
    assert outcomes.count("ok") >= 4 and "full" in outcomes


def test_device_lists():
    from aioti.replica import devices

    assert devices("cpu") == ["cpu"]
    assert devices(["cpu", torch.device("cpu")]) == ["cpu", torch.device("cpu")]
    if torch.cuda.device_count() == 0:
        with pytest.raises(aioti.BackendError, match="no cuda device is visible"):
            devices("cuda:*")
    with pytest.raises(aioti.BackendError, match="at least one"):
        devices([])


@two_gpus
async def test_two_gpus_match_eager(models):
    from aioti.testing import compile_model

    path = compile_model("mid_mlp", "cuda")
    eager = eager_model("mid_mlp", "cuda")
    xs = [torch.randn(1 + i % 4, 1024, device=f"cuda:{i % 2}") for i in range(256)]
    async with aioti.load(path, device="cuda:*") as model:
        results = await call_all(model, xs, rounds=2)
        stats = model.stats()
    with torch.no_grad():
        for r, x in zip(results, xs):
            assert r.device == x.device  # inputs on a device ran on that device's replica
            assert torch.allclose(r, eager(x.to("cuda:0")).to(x.device), atol=1e-3)
    assert all(r["completed"] > 0 for r in stats["replicas"])
