"""Constants from async code: each call against the eager oracle, hot swaps under load."""

from __future__ import annotations

import json
import sys

import anyio
import pytest
import torch

import aioti
from aioti.testing import eager_model

pytestmark = pytest.mark.anyio


def weights(name: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in eager_model(name).state_dict().items()}


def eager_with(name: str, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    m = eager_model(name)
    m.load_state_dict(sd)
    return m


async def test_properties_and_extract(models):
    async with aioti.load(models["buffers"]) as model:
        assert set(model.constant_fqns.values()) == set(eager_model("buffers").state_dict())
        assert all(d == torch.float32 for d in model.constant_dtypes.values())
        assert model.call_spec is not None
        if not model.container.library.has("ExtractConstantsMapEntries"):  # torch 2.11
            with pytest.raises(aioti.UnsupportedOperation, match="ExtractConstantsMapEntries"):
                await model.extract_constants()
            return
        got = await model.extract_constants(by_fqn=True)
        for k, v in eager_model("buffers").state_dict().items():
            assert torch.equal(got[k], v)


@pytest.mark.parametrize("source", ["mapping", "torch.save", "safetensors"])
async def test_update_active_from_sources(models, tmp_path, source):
    sd = weights("buffers", 3)
    mapping: object = sd
    if source == "torch.save":
        mapping = tmp_path / "w.pt"
        torch.save(sd, mapping)
    elif source == "safetensors":
        from safetensors.torch import save_file

        mapping = tmp_path / "w.safetensors"
        save_file(sd, str(mapping))
    x = torch.randn(8, 16)
    async with aioti.load(models["buffers"]) as model:
        await model.update_constants(mapping, validate_full=True)
        assert torch.allclose(await model(x), eager_with("buffers", sd)(x), atol=1e-5)


async def test_inactive_fold_swap_rollback_free(models):
    x = torch.randn(5, 32)
    sd = weights("folding", 4)
    async with aioti.load(models["folding"]) as model:
        old = await model(x)
        await model.update_inactive_constants(sd)
        await model.fold_constants(inactive=True)
        assert torch.allclose(await model(x), old)
        await model.swap_constants()
        assert torch.allclose(await model(x), eager_with("folding", sd)(x), atol=1e-4)
        await model.swap_constants()
        assert torch.allclose(await model(x), old)
        # The inactive buffer holds folded constants: freeing it would crash its next update.
        with pytest.raises(aioti.UnsupportedOperation, match="runtime-folded"):
            await model.free_inactive_constants()
        sd2 = weights("folding", 5)
        await model.hot_swap(sd2)
        assert torch.allclose(await model(x), eager_with("folding", sd2)(x), atol=1e-4)
        await model.update_constants(sd)
        await model.fold_constants()
        assert torch.allclose(await model(x), eager_with("folding", sd)(x), atol=1e-4)
    async with aioti.load(models["buffers"]) as model:  # no folded constants: freed
        y = torch.randn(8, 16)
        await model.update_inactive_constants(weights("buffers", 1))
        await model.free_inactive_constants()
        with pytest.raises(aioti.InputError, match="swap refused"):
            await model.swap_constants()
        await model.hot_swap(weights("buffers", 2))
        assert torch.allclose(await model(y), eager_with("buffers", weights("buffers", 2))(y),
                              atol=1e-5)


async def test_load_constants_from_blob(models, tmp_path):
    async with aioti.load(models["blob"]) as model:
        x = torch.randn(8, 16)
        assert torch.allclose(await model(x), eager_model("buffers")(x), atol=1e-5)
        blob = model.files.blob
        await model.update_constants(weights("buffers", 7))
        await model.load_constants_from_blob(blob)  # back to the package's weights
        assert torch.allclose(await model(x), eager_model("buffers")(x), atol=1e-5)


@pytest.mark.parametrize(("bad", "error", "named"), [
    ({"nope": torch.zeros(1)}, aioti.InputError, "unknown constant(s) 'nope'"),
    ({"fc.weight": torch.zeros(3)}, aioti.InputError, "expected shape"),
    ({"fc.weight": torch.zeros(16, 16, dtype=torch.int64)}, aioti.InputError, "expected dtype"),
    ({"fc.weight": [[0.0] * 16] * 16}, aioti.InputError, "expected a torch.Tensor, got list"),
    ([torch.zeros(16, 16)], TypeError, "a mapping of names to tensors"),
    (".", aioti.InputError, "is not a file"),
], ids=["unknown", "shape", "dtype", "list value", "not a mapping", "a directory"])
async def test_bad_mapping_changes_nothing(models, bad, error, named):
    x = torch.randn(8, 16)
    async with aioti.load(models["buffers"]) as model:
        before = await model(x)
        for call in (model.update_constants, model.hot_swap, model.update_inactive_constants):
            with pytest.raises(error) as caught:
                await call(bad)
            assert named in str(caught.value)
        assert torch.allclose(await model(x), before)


async def test_hot_swap_under_load_nothing_torn(models):
    """64 tasks run while 20 hot swaps alternate two weight sets: every output equals the eager
    output under exactly one of the sets, and no request fails."""
    a, b = weights("small_mlp", 1), weights("small_mlp", 2)
    ea, eb = eager_with("small_mlp", a), eager_with("small_mlp", b)
    xs = [torch.randn(4, 64) for _ in range(16)]
    ra, rb = [ea(x) for x in xs], [eb(x) for x in xs]
    bad, count = [], 0
    async with aioti.load(models["small_mlp"]) as model:
        await model.update_constants(a)
        done = False

        async def client(i: int) -> None:
            nonlocal count
            while not done:
                k = i % len(xs)
                out = await model(xs[k])
                hits = torch.allclose(out, ra[k], atol=1e-5) + torch.allclose(out, rb[k], atol=1e-5)
                count += 1
                if hits != 1:
                    bad.append(k)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i in range(64):
                    tg.start_soon(client, i)
                for n in range(20):
                    await model.hot_swap(b if n % 2 == 0 else a)
                    await anyio.sleep(0.005)
                done = True
        stats = model.stats()
    assert not bad and count > 100
    assert stats["failed"] == 0


async def test_cancelled_hot_swap_is_consistent(models):
    a = eager_model("mid_mlp").state_dict()
    b = weights("mid_mlp", 5)
    x = torch.randn(2, 1024)
    ra, rb = eager_with("mid_mlp", a)(x), eager_with("mid_mlp", b)(x)
    async with aioti.load(models["mid_mlp"]) as model:
        for delay in (0.0, 0.001, 0.005, 0.02):
            with anyio.move_on_after(delay):
                await model.hot_swap(b)
            out = await model(x)
            assert torch.allclose(out, ra, atol=1e-4) or torch.allclose(out, rb, atol=1e-4)
            with anyio.fail_after(30):
                await model.update_constants(a)  # the lock was released
            assert torch.allclose(await model(x), ra, atol=1e-4)


async def test_mutations_are_serialized(models):
    async with aioti.load(models["small_mlp"]) as model:
        sets = [weights("small_mlp", s) for s in range(6)]
        async with anyio.create_task_group() as tg:
            for sd in sets:
                tg.start_soon(model.hot_swap, sd)
        x = torch.randn(3, 64)
        out = await model(x)
        assert sum(torch.allclose(out, eager_with("small_mlp", sd)(x), atol=1e-5)
                   for sd in sets) == 1



CLOSE_DURING_SWAPS = """
import json, sys, anyio
import aioti
from aioti.testing import eager_model
path, backend = sys.argv[1], sys.argv[2]
new = {k: v + 0.1 for k, v in eager_model("mid_mlp").state_dict().items()}
outcomes = {"ok": 0, "closed": 0}

async def main():
    for i in range(30):
        model = await aioti.load(path)

        async def swap():
            try:
                await model.hot_swap(new)
                outcomes["ok"] += 1
            except aioti.ClosedError:
                outcomes["closed"] += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(swap)
            await anyio.sleep(0.0005 * (i % 8))
            await model.aclose()

anyio.run(main, backend=backend)
print(json.dumps(outcomes))
"""


async def test_close_during_hot_swaps(models, anyio_backend):
    """A model closed while a hot swap runs: the swap finishes or raises ClosedError, and the
    native container is deleted only once the constant operation in progress has returned
    (deleting it under a running update crashed the process). In a child process, so that a
    crash fails this test only."""
    with anyio.fail_after(240):
        proc = await anyio.run_process(
            [sys.executable, "-c", CLOSE_DURING_SWAPS, str(models["mid_mlp"]), anyio_backend],
            check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    outcomes = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert sum(outcomes.values()) == 30


async def test_partial_hot_swaps_apply_to_the_current_weights(models):
    x = torch.randn(8, 16)
    a = weights("buffers", 1)
    w = torch.randn(16, 16)
    async with aioti.load(models["buffers"]) as model:
        if not model.container.library.has("ExtractConstantsMapEntries"):
            pytest.skip("torch 2.11 libraries cannot read the active buffer")
        await model.hot_swap(a)
        await model.hot_swap({"fc.weight": w})  # on top of a, not of the initial weights
        assert torch.allclose(await model(x), eager_with("buffers", {**a, "fc.weight": w})(x),
                              atol=1e-5)
        await model.hot_swap({"scale": a["scale"] * 2})
        want = {**a, "fc.weight": w, "scale": a["scale"] * 2}
        assert torch.allclose(await model(x), eager_with("buffers", want)(x), atol=1e-5)
        await model.swap_constants()  # rolls back one step
        assert torch.allclose(await model(x), eager_with("buffers", {**a, "fc.weight": w})(x),
                              atol=1e-5)
