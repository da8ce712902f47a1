"""CUDA graph replay (`aioti.CudaGraphs`, runtime/graphs.py) against the eager module: captured
and padded sizes, sizes without a graph, hot swaps and constant updates (graphs recaptured or
kept, proven by outputs that would be stale otherwise), dynamic batching, caller streams, a
model that cannot be captured, the memory bound. CUDA tests skip cleanly without a GPU."""

from __future__ import annotations

import warnings

import pytest
import torch
from load import call_all, swap_under_load
from torch import nn
from torch.export import Dim

import aioti
from aioti.core import runmany
from aioti.errors import InputError
from aioti.testing import MODELS, ModelSpec, compile_model, eager_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SIZES = (1, 2, 4, 8, 16, 32, 64)


class Syncing(nn.Module):
    """A data-dependent shape (boolean mask indexing): the run copies a count to the host, which
    a CUDA graph cannot capture."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x[x > 0].sum()


MODELS.setdefault("syncing_v1", ModelSpec(
    Syncing, lambda b: ((torch.randn(b, 16),), {}),
    lambda: {"x": {0: Dim("batch", min=1, max=64)}}))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-3, rtol=1e-3)


def perturbed(name: str, seed: int = 3) -> nn.Module:
    m = eager_model(name, "cuda")
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for t in m.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g, device="cuda") * 0.05)
    return m


def test_options_are_checked():
    with pytest.raises(ValueError, match="batch_sizes"):
        aioti.CudaGraphs(batch_sizes=(0, 2))
    with pytest.raises(ValueError, match="max_memory_mb"):
        aioti.CudaGraphs(max_memory_mb=0)
    with pytest.raises(ValueError, match="warmup"):
        aioti.CudaGraphs(warmup=0)


@pytest.mark.anyio
async def test_refused_off_cuda(anyio_backend, models):
    with pytest.raises(InputError, match="cuda_graphs needs a CUDA device; this model is on cpu"):
        await aioti.load(models["small_mlp"], cuda_graphs=aioti.CudaGraphs())


@cuda
@pytest.mark.anyio
async def test_replays_match_eager(anyio_backend):
    """64 callers over 4 worker streams: captured sizes replay, other sizes up to 64 replay
    padded (the model's rows are independent), larger ones run without a graph."""
    path = compile_model("mid_mlp", "cuda")
    eager = eager_model("mid_mlp", "cuda")
    xs = [torch.randn(n, 1024, device="cuda") for n in [1, 2, 3, 5, 8, 40, 64, 100] * 8]
    async with aioti.load(path, device="cuda", workers=4,
                          cuda_graphs=aioti.CudaGraphs(SIZES)) as model:
        got = await call_all(model, xs)
        stats = model.stats()["cuda_graphs"]
    with torch.no_grad():
        assert all(close(g, eager(x)) for g, x in zip(got, xs))
    assert stats["graphs"] == 4 * len(SIZES) and stats["sizes"] == list(SIZES)
    assert stats["padding"] and stats["disabled"] is None
    assert stats["replays"] >= 7 * 8 and stats["fallbacks"] >= 8  # the 100-row runs
    assert stats["memory_bytes"] > 0


@cuda
@pytest.mark.anyio
@pytest.mark.parametrize("native", [True, False], ids=["native", "driver-calls"])
async def test_lone_replays_keep_their_outputs(anyio_backend, native, monkeypatch):
    """Lone requests one after another, each replayed on its caller's thread into its graph's
    spare outputs (the next spare allocated while the GPU runs it): every output kept stays its
    own request's, at captured and padded sizes, and the spares are reported. Outputs handed
    out twice would hold a later request's values. Without the native helper (no compiler),
    each copy node is set and each graph launched by a driver call of its own."""
    if not native:
        monkeypatch.setattr(runmany, "replayer", lambda: None)
    path = compile_model("mid_mlp", "cuda")
    eager = eager_model("mid_mlp", "cuda")
    xs = [torch.randn(n, 1024, device="cuda") for n in [1, 1, 3, 3, 4, 1, 3, 4] * 4]
    async with aioti.load(path, device="cuda", workers=1,
                          cuda_graphs=aioti.CudaGraphs((1, 4))) as model:
        got = [await model(x) for x in xs]
        stats = model.stats()["cuda_graphs"]
    with torch.no_grad():
        assert all(close(g, eager(x)) for g, x in zip(got, xs))
    assert len({g.data_ptr() for g in got}) == len(xs)
    assert stats["replays"] == len(xs) and stats["fallbacks"] == 0
    assert stats["spare_bytes"] == (1 + 4) * 1024 * 4  # one spare per graph, of its last rows


@cuda
@pytest.mark.anyio
async def test_refused_replay_step_runs_without_graph(anyio_backend):
    """A replay step the driver refuses (here: size 1's copy nodes swapped for another graph's,
    which the driver rejects, as it does a node pointed at memory it cannot reach that way)
    leaves the runs not yet queued to run without a graph: outputs still match the eager
    module, lone and in chunks, with one warning and the failures counted."""
    path = compile_model("mid_mlp", "cuda")
    eager = eager_model("mid_mlp", "cuda")
    xs = [torch.randn(1, 1024, device="cuda") for _ in range(16)]
    async with aioti.load(path, device="cuda", workers=1,
                          cuda_graphs=aioti.CudaGraphs((1, 2))) as model:
        runner = model._replicas[0].graphs
        assert runner is not None
        for own in runner._sets:
            own.graphs[1].in_nodes = own.graphs[2].in_nodes
        with pytest.warns(RuntimeWarning, match="a replay step failed"):
            got = [await model(x) for x in xs[:4]]
        got += await call_all(model, xs[4:])
        stats = model.stats()["cuda_graphs"]
    with torch.no_grad():
        assert all(close(g, eager(x)) for g, x in zip(got, xs))
    assert stats["failed_steps"] >= 4 and stats["fallbacks"] >= 16 and stats["replays"] == 0


@cuda
@pytest.mark.parametrize("graphs,device,name", [(True, "cuda", "mid_mlp"),
                                                (False, "cuda", "small_mlp"),
                                                (True, ["cuda:0", "cuda:0"], "mid_mlp")],
                         ids=["graphs", "plain", "pool-graphs"])
def test_loops_in_threads_get_their_own_outputs(graphs, device, name):
    """Two asyncio and two trio loops, each in a thread that never used CUDA itself, send lone
    requests to a model with one worker, each loop alone first, then all at once. With graphs,
    one loop's lone run replays the lead's graphs on its own thread while the lead replays
    another loop's request: before the replays of a set were queued under its lock, 1 in 240
    to 1 in 2000 requests got another loop's output (H200 runs). In such a thread no CUDA
    context is current until aioti makes the device's current (the driver's calls failed with
    CUDA_ERROR_INVALID_CONTEXT). A pool of two replicas on one GPU does the same with each
    replica's lead, and both replicas serve. Plain runs are the small model's: the mid one's
    may be measured too long to run on a caller's thread on a slow host (all at once, plain
    runs may not find the model idle)."""
    import asyncio
    import threading

    import trio

    path = compile_model(name, "cuda")
    eager = eager_model(name, "cuda")
    xs = [torch.randn(1, 64 if name == "small_mlp" else 1024, device="cuda") * (i + 1)
          for i in range(4)]
    with torch.no_grad():
        want = [eager(x) for x in xs]

    async def opened() -> aioti.AsyncModel:
        return await aioti.load(path, device=device, workers=1,
                                cuda_graphs=aioti.CudaGraphs((1,)) if graphs else None)

    model = asyncio.run(opened())
    got: list[list[torch.Tensor]] = [[] for _ in xs]
    # Each loop first calls alone (lone requests to an idle model run on its own thread), and
    # all then call at once. Both block the loop's thread, whose only task this is.
    turn, all_at_once = threading.Lock(), threading.Barrier(len(xs), timeout=60)
    alone = [0] * len(xs)  # the requests of a loop's turn run on its thread

    async def client(i: int) -> None:
        with turn:
            before = model.stats()["ran_on_caller_thread"]
            for _ in range(20):
                got[i].append(await model(xs[i]))
            alone[i] = model.stats()["ran_on_caller_thread"] - before
        all_at_once.wait()
        for _ in range(3000 - 20):
            got[i].append(await model(xs[i]))

    try:
        threads = [threading.Thread(target=asyncio.run, args=(client(i),)) for i in (0, 1)]
        threads += [threading.Thread(target=trio.run, args=(client, i)) for i in (2, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        stats = model.stats()
    finally:
        asyncio.run(model.aclose())
    assert min(alone) > 0 and stats["completed"] == 4 * 3000
    if graphs:  # replays on the loops' threads beside the lead's (plain runs, slower, may not)
        assert stats["ran_on_caller_thread"] > sum(alone)
    assert all(r["completed"] > 0 for r in stats.get("replicas", [stats]))
    wrong = [sum(not close(o, w) for o in outs) for outs, w in zip(got, want)]
    assert wrong == [0, 0, 0, 0]


@cuda
@pytest.mark.anyio
async def test_constant_changes_never_replay_old_weights(anyio_backend):
    """A hot swap moves the active constants: replaying the graphs captured before would give
    the old weights' outputs, so the graphs are recaptured. A copying update writes in place:
    the graphs stay and see it (torch 2.11's libraries cannot copy: aioti's update hands over a
    private copy, which moves the constants, so the graphs are recaptured)."""
    path = compile_model("mid_mlp", "cuda")
    old, new, third = eager_model("mid_mlp", "cuda"), perturbed("mid_mlp"), perturbed("mid_mlp", 4)
    x = torch.randn(3, 1024, device="cuda")
    async with aioti.load(path, device="cuda", workers=2,
                          cuda_graphs=aioti.CudaGraphs((1, 4))) as model:
        with torch.no_grad():
            assert close(await model(x), old(x))
            first = model.stats()["cuda_graphs"]["captures"]
            await model.hot_swap(new.state_dict())
            assert close(await model(x), new(x))
            swapped = model.stats()["cuda_graphs"]
            assert swapped["captures"] == 2 * first and not swapped["stale"]
            copies = model.container.library.has("UpdateConstantBufferPairs")
            await model.update_constants(third.state_dict())  # into the active buffer
            assert close(await model(x), third(x))
            expected = 2 * first if copies else 3 * first
            assert model.stats()["cuda_graphs"]["captures"] == expected
            await model.swap_constants()  # back to the first buffer: recaptured
            assert close(await model(x), old(x))
            assert model.stats()["cuda_graphs"]["captures"] == expected + first
        assert model.stats()["cuda_graphs"]["replays"] >= 4


@cuda
@pytest.mark.anyio
async def test_with_dynamic_batching(anyio_backend):
    path = compile_model("mid_mlp", "cuda")
    eager = eager_model("mid_mlp", "cuda")
    xs = [torch.randn(1 + i % 3, 1024, device="cuda") for i in range(128)]
    async with aioti.load(path, device="cuda", batching=aioti.Batching(64, 2.0),
                          cuda_graphs=aioti.CudaGraphs(SIZES)) as model:
        got = await call_all(model, xs)
        stats = model.stats()
    with torch.no_grad():
        assert all(close(g, eager(x)) for g, x in zip(got, xs))
    assert stats["cuda_graphs"]["replays"] > 0
    assert max(stats["batching"]["batch_rows"]) > 3


@cuda
@pytest.mark.anyio
async def test_inputs_on_the_callers_stream_are_waited_for(anyio_backend):
    path = compile_model("mid_mlp", "cuda")
    eager = eager_model("mid_mlp", "cuda")
    side = torch.cuda.Stream()
    a = torch.randn(2048, 2048, device="cuda")
    async with aioti.load(path, device="cuda", cuda_graphs=aioti.CudaGraphs((2,))) as model:
        with torch.cuda.stream(side):
            y = a
            for _ in range(20):  # keeps the side stream busy for a while
                y = (y @ a).tanh()
            x = y[:2, :1024].contiguous()
            got = await model(x)
        side.synchronize()
        with torch.no_grad():
            assert close(got, eager(x))
        assert model.stats()["cuda_graphs"]["replays"] == 1


@cuda
@pytest.mark.anyio
async def test_a_lone_request_replays_on_the_callers_thread(anyio_backend):
    """With graphs, a lone request to the idle model runs on its caller's thread through the
    lead worker's graphs (its stream's: not the caller's, which has none); one whose caller's
    stream still has work queued goes to the worker (the caller's thread would wait for it)."""
    path = compile_model("mid_mlp", "cuda")
    eager = eager_model("mid_mlp", "cuda")
    x = torch.randn(1, 1024, device="cuda")
    async with aioti.load(path, device="cuda", cuda_graphs=aioti.CudaGraphs((1, 2))) as model:
        for _ in range(20):  # the workers measure the model's runs first
            await model(x)
        before = model.stats()
        outs = [await model(x) for _ in range(5)]
        after = model.stats()
        assert after["ran_on_caller_thread"] >= before["ran_on_caller_thread"] + 4
        assert after["cuda_graphs"]["replays"] == before["cuda_graphs"]["replays"] + 5
        assert after["cuda_graphs"]["fallbacks"] == before["cuda_graphs"]["fallbacks"]
        late = torch.empty(1, 1024, device="cuda")
        torch.cuda._sleep(50_000_000)  # the caller's stream is busy for a while
        late.copy_(x * 2)
        busy = await model(late)
        assert model.stats()["ran_on_caller_thread"] == after["ran_on_caller_thread"]
        with torch.no_grad():
            assert all(close(o, eager(x)) for o in outs)
            assert close(busy, eager(2 * x))


@cuda
@pytest.mark.anyio
async def test_a_model_that_cannot_be_captured_runs_without_graphs(anyio_backend):
    path = compile_model("syncing_v1", "cuda")
    x = torch.randn(4, 16, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = await aioti.load(path, device="cuda", cuda_graphs=aioti.CudaGraphs((4,)))
    async with model:
        assert any("cuda_graphs turned off" in str(w.message) for w in caught)
        assert model.stats()["cuda_graphs"]["disabled"]
        assert close(await model(x), Syncing()(x))


@cuda
@pytest.mark.anyio
async def test_memory_bound(anyio_backend):
    path = compile_model("mid_mlp", "cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = await aioti.load(path, device="cuda", workers=2,
                                 cuda_graphs=aioti.CudaGraphs(SIZES, max_memory_mb=1e-3))
    async with model:
        stats = model.stats()["cuda_graphs"]
        assert stats["graphs"] < 2 * len(SIZES)
        assert any("max_memory_mb" in str(w.message) for w in caught)
        x = torch.randn(64, 1024, device="cuda")
        with torch.no_grad():
            assert close(await model(x), eager_model("mid_mlp", "cuda")(x))


@cuda
@pytest.mark.anyio
async def test_hot_swap_under_load(anyio_backend):
    """64 callers while the weights are swapped: every output is the old weights' or the new
    weights', none torn, and every call that starts after the swap returned sees the new."""
    path = compile_model("mid_mlp", "cuda")
    old, new = eager_model("mid_mlp", "cuda"), perturbed("mid_mlp")
    xs = [torch.randn(1 + i % 4, 1024, device="cuda") for i in range(256)]
    with torch.no_grad():
        before, after = [old(x) for x in xs], [new(x) for x in xs]
    async with aioti.load(path, device="cuda", workers=2,
                          cuda_graphs=aioti.CudaGraphs((1, 2, 4))) as model:
        torn, late = await swap_under_load(model, xs, before, after, new.state_dict(), close)
        assert model.stats()["cuda_graphs"]["replays"] > 0
    assert torn == [] and late == []


@cuda
@pytest.mark.anyio
async def test_a_replica_pool_with_graphs(anyio_backend):
    """Two replicas (on one GPU here: the same code as on two) each capture and recapture."""
    path = compile_model("mid_mlp", "cuda")
    old, new = eager_model("mid_mlp", "cuda"), perturbed("mid_mlp")
    xs = [torch.randn(1 + i % 4, 1024, device="cuda") for i in range(64)]
    async with aioti.load(path, device=["cuda:0", "cuda:0"],
                          cuda_graphs=aioti.CudaGraphs((1, 2, 4))) as model:
        got = await call_all(model, xs)
        await model.hot_swap(new.state_dict())
        swapped = await call_all(model, xs)
        per = model.stats()["replicas"]
    with torch.no_grad():
        assert all(close(g, old(x)) for g, x in zip(got, xs))
        assert all(close(g, new(x)) for g, x in zip(swapped, xs))
    assert all(r["cuda_graphs"]["captures"] == 2 * 3 and r["completed"] > 0 for r in per)
