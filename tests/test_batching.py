"""Dynamic batching: equal to unbatched runs, limits respected, failures and cancels isolated."""

from __future__ import annotations

import random

import anyio
import pytest
import torch

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


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_random_mixes_equal_unbatched(models, seed):
    rnd = random.Random(seed)
    eager = eager_model("multi_io")
    scale = torch.rand(8) + 0.5
    reqs = [((torch.randn(n, 16), torch.randn(n, 8)), {"scale": scale})
            for n in (rnd.randint(1, 9) for _ in range(60))]
    cfg = aioti.Batching(max_batch_size=16, max_delay_ms=2)
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


async def test_mixed_shapes_and_bad_input_isolated(models):
    eager = eager_model("small_mlp")
    xs = [torch.randn(2, 64) for _ in range(30)]
    reqs = [((x,), {}) for x in xs] + [((torch.randn(2, 63),), {})] + \
           [((torch.randn(3, 64).double(),), {})]
    async with aioti.load(models["small_mlp"], batching=aioti.Batching(8, 5)) as model:
        outs = await run_all(model, reqs)
    for x, got in zip(xs, outs):
        assert torch.allclose(got, eager(x), atol=1e-5)
    assert isinstance(outs[-2], aioti.InputError) and isinstance(outs[-1], aioti.InputError)


async def test_batch_dim_maximum_respected(models):
    # multi_io's batch dim is exported with max=64: batches never exceed it.
    scale = torch.rand(8)
    reqs = [((torch.randn(40, 16), torch.randn(40, 8)), {"scale": scale}) for _ in range(6)]
    async with aioti.load(models["multi_io"], batching=aioti.Batching(512, 5)) as model:
        outs = await run_all(model, reqs)
        rows = model.stats()["batching"]["batch_rows"]
    assert all(not isinstance(o, Exception) for o in outs)
    assert max(rows) <= 64


async def test_full_batch_counts_rows_not_requests(models):
    # max_batch_size counts rows: two 4-row requests fill a batch of 8 and are dispatched at
    # once. Were fullness counted in requests (8), every batch of these 4 tasks would wait out
    # the 60 s delay, and the bound below would fail the test.
    eager = eager_model("small_mlp")
    xs = [torch.randn(4, 64) for _ in range(4)]
    async with aioti.load(models["small_mlp"], workers=1,
                          batching=aioti.Batching(max_batch_size=8, max_delay_ms=60_000)) as model:
        got: list[torch.Tensor] = []

        async def client(x: torch.Tensor) -> None:
            for _ in range(20):
                got.append(await model(x))

        with anyio.fail_after(20):
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


async def test_batching_with_hot_swaps(models):
    eager = eager_model("small_mlp")
    a = eager.state_dict()
    b = {k: v + 0.1 for k, v in a.items()}
    eb = eager_model("small_mlp")
    eb.load_state_dict(b)
    x = torch.randn(1, 64)
    ra, rb = eager(x), eb(x)
    async with aioti.load(models["small_mlp"], batching=aioti.Batching(32, 1)) as model:
        outs = []

        async def client():
            for _ in range(20):
                outs.append(await model(x))

        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(client)
            for i in range(6):
                await model.hot_swap(b if i % 2 == 0 else a)
    assert all(torch.allclose(o, ra, atol=1e-5) or torch.allclose(o, rb, atol=1e-5) for o in outs)


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
