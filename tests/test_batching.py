"""Dynamic batching: equal to unbatched runs, limits respected, failures and cancels isolated."""

from __future__ import annotations

import random
import threading

import anyio
import pytest
import torch
from load import call_from_three_loops
from outcomes import outcome

import aioti
from aioti.testing import eager_model

pytestmark = pytest.mark.anyio


async def run_all(model, requests):
    out = [None] * len(requests)

    async def one(i, args, kwargs):
        try:
            out[i] = await model(*args, **kwargs)
        except aioti.AiotiError as exc:
            out[i] = exc

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i, (a, k) in enumerate(requests):
                tg.start_soon(one, i, a, k)
    return out


#: every behaviour below holds with batches run by a worker thread and on the loop's own thread
on_loop = pytest.mark.parametrize("on_loop", [False, True], ids=["worker", "on_loop"])


@on_loop
@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_random_mixes_equal_unbatched(models, seed, on_loop):
    rnd = random.Random(seed)
    eager = eager_model("multi_io")
    scale = torch.rand(8) + 0.5
    reqs = [((torch.randn(n, 16), torch.randn(n, 8)), {"scale": scale})
            for n in (rnd.randint(1, 9) for _ in range(60))]
    cfg = aioti.Batching(max_batch_size=16, max_delay_ms=2, on_loop=on_loop)
    async with aioti.load(models["multi_io"], batching=cfg) as model:
        outs = await run_all(model, reqs)
        stats = model.stats()["batching"]
    for (a, k), got in zip(reqs, outs):
        ref = eager(*a, **k)
        assert got["sum"].shape == ref["sum"].shape
        assert torch.allclose(got["sum"], ref["sum"], atol=1e-5)
        assert torch.allclose(got["pair"][0], ref["pair"][0], atol=1e-5)
        assert got["pair"][1].dtype == torch.float64
    assert max(stats["batch_rows"]) <= 16
    assert stats["runs"] < len(reqs)  # something was merged


@on_loop
async def test_mixed_shapes_and_bad_input_isolated(models, on_loop):
    eager = eager_model("small_mlp")
    xs = [torch.randn(2, 64) for _ in range(30)]
    reqs = [((x,), {}) for x in xs] + [((torch.randn(2, 63),), {})] + \
           [((torch.randn(3, 64).double(),), {})]
    cfg = aioti.Batching(8, 5, on_loop=on_loop)
    async with aioti.load(models["small_mlp"], batching=cfg) as model:
        outs = await run_all(model, reqs)
    for x, got in zip(xs, outs):
        assert torch.allclose(got, eager(x), atol=1e-5)
    assert isinstance(outs[-2], aioti.InputError) and isinstance(outs[-1], aioti.InputError)


@on_loop
async def test_unchecked_inputs_batch_alike(models, on_loop):
    """check_inputs=False: requests are grouped by their own shapes all the same (the note
    otherwise kept on the checked layout is kept by shapes)."""
    eager = eager_model("small_mlp")
    xs = [torch.randn(1 + i % 3, 64) for i in range(40)]
    cfg = aioti.Batching(16, 5, on_loop=on_loop)
    async with aioti.load(models["small_mlp"], batching=cfg, check_inputs=False) as model:
        outs = await run_all(model, [((x,), {}) for x in xs])
        stats = model.stats()["batching"]
    assert all(torch.allclose(g, eager(x), atol=1e-5) for x, g in zip(xs, outs))
    assert stats["runs"] < len(xs) and max(stats["batch_rows"]) <= 16


@on_loop
async def test_batch_dim_maximum_respected(models, on_loop):
    # multi_io's batch dim is exported with max=64: batches never exceed it.
    scale = torch.rand(8)
    reqs = [((torch.randn(40, 16), torch.randn(40, 8)), {"scale": scale}) for _ in range(6)]
    cfg = aioti.Batching(512, 5, on_loop=on_loop)
    async with aioti.load(models["multi_io"], batching=cfg) as model:
        outs = await run_all(model, reqs)
        rows = model.stats()["batching"]["batch_rows"]
    assert all(not isinstance(o, Exception) for o in outs)
    assert max(rows) <= 64


async def test_full_batch_counts_rows_not_requests(models):
    # max_batch_size counts rows: two 4-row requests fill a batch of 8 and are dispatched at
    # once. Were fullness counted in requests (8), every batch of these pairs would wait out the
    # 60 s delay, and the bound below would fail the test. Rounds of exactly one full batch:
    # a request left alone after a merged batch would (rightly) wait out the delay.
    eager = eager_model("small_mlp")
    xs = [torch.randn(4, 64) for _ in range(2)]
    async with aioti.load(models["small_mlp"], workers=1,
                          batching=aioti.Batching(max_batch_size=8, max_delay_ms=60_000)) as model:
        got: list[torch.Tensor] = []

        async def client(x: torch.Tensor) -> None:
            got.append(await model(x))

        with anyio.fail_after(20):
            for _ in range(40):
                async with anyio.create_task_group() as tg:
                    for x in xs:
                        tg.start_soon(client, x)
        rows = model.stats()["batching"]["batch_rows"]
    assert len(got) == 80 and max(rows) == 8
    assert all(any(torch.allclose(g, eager(x), atol=1e-5) for x in xs) for g in got)


async def test_cancel_inside_batch(models):
    eager = eager_model("mid_mlp")
    async with aioti.load(models["mid_mlp"], workers=1, batching=aioti.Batching(64, 20)) as model:
        x = torch.randn(1, 1024)
        big = torch.randn(256, 1024)
        kept = []

        async def keep():
            kept.append(await model(x))

        async with anyio.create_task_group() as tg:
            tg.start_soon(model, big)  # keeps the worker busy while the rest queue up
            await anyio.sleep(0.002)
            for _ in range(10):
                tg.start_soon(keep)
            with anyio.move_on_after(0.001):
                await model(torch.randn(1, 1024))
        assert len(kept) == 10 and all(torch.allclose(k, eager(x), atol=1e-4) for k in kept)
        assert model.stats()["cancelled"] == 1
        assert model.stats()["completed"] == 11


async def test_model_without_batch_dim_refused(models):
    with pytest.raises(aioti.InputError, match="cannot be batched|dynamic dim"):
        await aioti.load(models["static_mlp"], batching=aioti.Batching())


async def test_model_mixing_rows_refused(models):
    """x - x.mean(0): each row's result depends on its batch, so merged requests would get
    other answers than alone; refused at load, with the reason."""
    with pytest.raises(aioti.InputError, match="depends on the other rows"):
        await aioti.load(models["row_mixing"], batching=aioti.Batching())
    x = torch.randn(5, 8)
    async with aioti.load(models["row_mixing"]) as model:  # unbatched: fine
        assert torch.allclose(await model(x), eager_model("row_mixing")(x), atol=1e-5)


@on_loop
async def test_batching_with_hot_swaps(models, on_loop):
    eager = eager_model("small_mlp")
    a = eager.state_dict()
    b = {k: v + 0.1 for k, v in a.items()}
    eb = eager_model("small_mlp")
    eb.load_state_dict(b)
    x = torch.randn(1, 64)
    ra, rb = eager(x), eb(x)
    cfg = aioti.Batching(32, 1, on_loop=on_loop)
    async with aioti.load(models["small_mlp"], batching=cfg) as model:
        outs = []

        async def client():
            for _ in range(20):
                outs.append(await model(x))

        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(client)
            for i in range(6):
                await model.hot_swap(b if i % 2 == 0 else a)
    assert len(outs) == 320
    assert all(torch.allclose(o, ra, atol=1e-5) or torch.allclose(o, rb, atol=1e-5) for o in outs)


async def test_on_loop_runs_on_the_loop_thread_and_keeps_its_team(models):
    """on_loop: every batch runs on the awaiting loop's thread, merged (16 tasks, one loop
    iteration's requests per batch), and the loop thread's own OpenMP team size is restored."""
    from aioti.core.threads import set_thread_team_size, thread_team_size

    eager = eager_model("small_mlp")
    xs = [torch.randn(1, 64) for _ in range(16)]
    own = thread_team_size()
    set_thread_team_size(3)
    try:
        async with aioti.load(models["small_mlp"],
                              batching=aioti.Batching(64, 5, on_loop=True)) as model:
            threads: set[int] = set()
            run_many = model._batcher._run_many

            def recording(batch, stream):
                threads.add(threading.get_ident())
                return run_many(batch, stream)

            model._batcher._run_many = recording
            outs: list[tuple[torch.Tensor, torch.Tensor]] = []

            async def client(x):
                for _ in range(10):
                    outs.append((x, await model(x)))

            with anyio.fail_after(20):
                async with anyio.create_task_group() as tg:
                    for x in xs:
                        tg.start_soon(client, x)
            stats = model.stats()
            assert thread_team_size() == 3
    finally:
        set_thread_team_size(own or 1)  # torch.get_num_threads() on this thread reads it
    assert threads == {threading.get_ident()}
    assert len(outs) == 160 and all(torch.allclose(g, eager(x), atol=1e-5) for x, g in outs)
    assert stats["batching"]["runs"] < 160 and stats["completed"] == 160


async def test_on_loop_warns_once_when_a_batch_holds_the_loop(models, monkeypatch):
    """Batches that keep the loop busy past `ON_LOOP_WARN_S` twice in a row warn, once per
    model, naming the time and the way out (the threshold is set to 0 here: every batch is
    past it)."""
    import warnings

    from aioti.runtime import inline

    monkeypatch.setattr(inline, "ON_LOOP_WARN_S", 0.0)
    x = torch.randn(4, 64)

    def slow(caught):
        return [w for w in caught if "kept the event loop busy" in str(w.message)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with aioti.load(models["small_mlp"],
                              batching=aioti.Batching(8, 5, on_loop=True)) as model:
            await model(x)
            assert slow(caught) == []  # one slow batch alone may be a GC pause: no warning
            for _ in range(3):
                await model(x)
    warned = slow(caught)
    assert len(warned) == 1 and issubclass(warned[0].category, RuntimeWarning)
    assert "on_loop=False" in str(warned[0].message)


async def test_on_loop_warning_made_an_error_stops_nothing(models, monkeypatch):
    """With warnings made errors (`-W error`), the slow on-loop warning is dropped rather than
    raised from the loop's callback (where it reached no caller, and ended a trio run)."""
    import warnings

    from aioti.runtime import inline

    monkeypatch.setattr(inline, "ON_LOOP_WARN_S", 0.0)
    x = torch.randn(4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        async with aioti.load(models["small_mlp"],
                              batching=aioti.Batching(8, 5, on_loop=True)) as model:
            with anyio.fail_after(30):
                outs = [await model(x) for _ in range(4)]
    assert all(o.shape == (4, 10) for o in outs)


async def test_on_loop_cancelled_request_never_runs(models):
    """A request whose caller leaves before the loop runs its batch is left out of it."""
    eager = eager_model("small_mlp")
    x = torch.randn(1, 64)
    async with aioti.load(models["small_mlp"], batching=aioti.Batching(64, 5, on_loop=True)
                          ) as model:
        kept = []

        async def keep():
            kept.append(await model(x))

        scope = anyio.CancelScope()

        async def leave():
            with scope:
                await model(torch.randn(1, 64))

        async def cancel():  # runs after `leave` queued its request, before the loop's batch
            scope.cancel()

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(keep)
                tg.start_soon(leave)
                tg.start_soon(cancel)
        stats = model.stats()
    assert len(kept) == 5 and all(torch.allclose(k, eager(x), atol=1e-5) for k in kept)
    assert stats["cancelled"] == 1 and stats["completed"] == 5
    assert sum(n * c for n, c in stats["batching"]["batch_rows"].items()) == 5


async def test_on_loop_serves_other_loops(models):
    """One on_loop model, awaited from this loop and from an asyncio and a trio loop in two
    other threads at once: a batch runs on whichever loop's thread takes it, and every caller
    gets its own rows back on its own loop."""
    eager = eager_model("small_mlp")
    async with aioti.load(models["small_mlp"], batching=aioti.Batching(64, 5, on_loop=True)
                          ) as model:
        results = await call_from_three_loops(model, eager, 8, lambda i: 1, 30)
    assert results == {"here": [True] * 160, "asyncio": [True] * 160, "trio": [True] * 160}


async def test_on_loop_close_with_queued_requests(models):
    """Closing while requests are queued for an on-loop batch: each caller gets its result or
    ClosedError, and nothing hangs."""
    eager = eager_model("small_mlp")
    x = torch.randn(1, 64)
    model = await aioti.load(models["small_mlp"], batching=aioti.Batching(4, 5, on_loop=True))
    outs: list[object] = []

    async def one():
        outs.append(await outcome(model(x), aioti.ClosedError))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for _ in range(32):
                tg.start_soon(one)
            await anyio.sleep(0)
            await model.aclose()
    assert len(outs) == 32
    assert all(isinstance(o, aioti.ClosedError) or torch.allclose(o, eager(x), atol=1e-5)
               for o in outs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_cuda_batching(models):
    """Batches merged on one CUDA worker stream: inputs made asynchronously on a caller's stream,
    requests of 1-3 rows, a hot swap in the middle; every caller gets its own rows."""
    from aioti.testing import compile_model

    path = compile_model("small_mlp", "cuda")
    eager = eager_model("small_mlp", "cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        xs = [torch.randn(1 + i % 3, 64, device="cuda") * 3 for i in range(96)]
    reqs = [((x,), {}) for x in xs]
    cfg = aioti.Batching(max_batch_size=32, max_delay_ms=2)
    async with aioti.load(path, device="cuda", workers=1, batching=cfg) as model:
        with torch.cuda.stream(side):  # the callers' current stream: the worker must wait on it
            first = await run_all(model, reqs)
        sd = {k: v.cpu() * 0.5 for k, v in eager.state_dict().items()}
        await model.hot_swap(sd)
        second = await run_all(model, reqs)
        stats = model.stats()["batching"]
    with torch.no_grad():
        before = [eager(x) for x in xs]
        eager.load_state_dict(sd)
        after = [eager(x) for x in xs]
    assert all(torch.allclose(g, r, atol=1e-4) for g, r in zip(first, before))
    assert all(torch.allclose(g, r, atol=1e-4) for g, r in zip(second, after))
    assert max(stats["batch_rows"]) <= 32
    assert stats["runs"] < 2 * len(reqs)  # something was merged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
async def test_on_loop_refused_on_cuda(models):
    from aioti.testing import compile_model

    with pytest.raises(aioti.InputError, match="CPU models only"):
        await aioti.load(compile_model("small_mlp", "cuda"), device="cuda",
                         batching=aioti.Batching(on_loop=True))


class PositionTable(torch.nn.Module):
    """x[B, S, 16], mask[B, S] and pos[S, 16]: an input without the batch dim (S at its dim 0)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return (x + pos) * mask[..., None]


async def test_an_input_without_the_batch_dim_passes_through(models):
    """The batch symbol is the one at dim 0 that no other dim uses (B, not S): requests that
    share the same `pos` tensor merge, and every caller gets its own rows."""
    from torch.export import Dim

    from aioti.testing import MODELS, ModelSpec, compile_model

    def inputs(b):
        return (torch.randn(b, 5, 16), torch.ones(b, 5), torch.randn(5, 16)), {}

    def dims():
        batch, seq = Dim("batch", min=1, max=64), Dim("seq", min=2, max=32)
        return ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: seq})

    MODELS.setdefault("position_table_v1", ModelSpec(PositionTable, inputs, dims))
    path = compile_model("position_table_v1")
    eager = PositionTable()
    pos = torch.randn(5, 16)
    xs = [(torch.randn(1 + i % 3, 5, 16), (torch.rand(1 + i % 3, 5) > 0.5).float())
          for i in range(96)]
    async with aioti.load(path, batching=aioti.Batching(32, 2.0)) as model:
        outs = [None] * len(xs)

        async def call(i):
            outs[i] = await model(xs[i][0], xs[i][1], pos)

        async with anyio.create_task_group() as tg:
            for i in range(len(xs)):
                tg.start_soon(call, i)
        stats = model.stats()["batching"]
    assert all(torch.allclose(o, eager(x, m, pos), atol=1e-5) for o, (x, m) in zip(outs, xs))
    assert max(stats["batch_rows"]) > 3  # requests sharing `pos` merged

