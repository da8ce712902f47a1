"""Every package torch's own loader loads: operators without a C shim (custom operators and some
of torch's own, run through aioti's proxy executor), weights outside the library (a blob,
`torch.save`d tensors, none at all), C++-only packages; and a compile-option matrix that runs
the same checks on each way of compiling one model, so that a new torch option shows up here as
a failing row. Oracles: the eager module, and torch's loader where it loads the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from load import call_all, swap_under_load
from torch import nn
from torch.export import Dim

import aioti
from aioti.core import open_container, open_model
from aioti.core import proxy as proxy_module
from aioti.errors import InputError, ModelLoadError, ModelRunError
from aioti.testing import MODELS, ModelSpec, compile_model, eager_model

# --- models ----------------------------------------------------------------------------------

@torch.library.custom_op("aioti_tests::scale_add", mutates_args=())
def scale_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """x * alpha + y, refusing NaN (so that a run can fail inside an operator)."""
    if torch.isnan(y).any():
        raise ValueError("scale_add: y holds NaN")
    return x * alpha + y


@scale_add.register_fake
def _(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("aioti_tests::shifted_halves", mutates_args=())
def shifted_halves(x: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + shift) split in two along dim 1: an integer known only at run time in, two out."""
    a, b = (x + shift).chunk(2, dim=1)
    return a.clone(), b.clone()


@shifted_halves.register_fake
def _(x: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    half = x.shape[1] // 2
    return x.new_empty(x.shape[0], half), x.new_empty(x.shape[0], x.shape[1] - half)


class CustomOps(nn.Module):
    """Two custom operators; the second takes the batch size, a symbolic int."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.ops.aioti_tests.scale_add(self.fc(x), x, 0.5)
        return torch.ops.aioti_tests.shifted_halves(h.relu(), x.shape[0])


class TorchOpsWithoutShim(nn.Module):
    """`linalg_qr` and `_linalg_eigh` have no C shim: inductor calls them through the proxy
    executor. Rows are independent, so the model batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, r = torch.linalg.qr(x)
        return q.abs().sum(-1) + r.abs().sum(-1) + torch.linalg.eigvalsh(x @ x.mT)


class MatrixNet(nn.Module):
    """Parameters and a buffer, a dynamic batch dim: the model of the compile-option matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.register_buffer("scale", torch.rand(16) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale: torch.Tensor = self.scale  # type: ignore[assignment]
        return self.fc2(torch.relu(self.fc1(x))) * scale


def _batched(width: int, max_: int = 64):
    return lambda b: ((torch.randn(b, width),), {})


#: the compile-option matrix: row -> inductor configs
MATRIX = {
    "in_library": {},
    "binary_blob": {"aot_inductor.package_constants_in_so": False,
                    "aot_inductor.package_constants_on_disk_format": "binary_blob"},
    "pickle_weights": {"aot_inductor.package_constants_in_so": False,
                       "aot_inductor.package_constants_on_disk_format": "pickle_weights"},
    "no_weights": {"aot_inductor.package_constants_in_so": False},
    "runtime_folding": {"aot_inductor.use_runtime_constant_folding": True},
    "freezing": {"freezing": True},
    "cpp_only": {"aot_inductor.package_cpp_only": True},
}

MODELS.setdefault("custom_ops_v1", ModelSpec(CustomOps, _batched(8),
                                             lambda: {"x": {0: Dim("batch", min=1, max=64)}}))
MODELS.setdefault("torch_ops_without_shim_v1", ModelSpec(
    TorchOpsWithoutShim, lambda b: ((torch.randn(b, 6, 6),), {}),
    lambda: {"x": {0: Dim("batch", min=1, max=64)}}))
for _row, _configs in MATRIX.items():
    MODELS.setdefault(f"matrix_{_row}_v1", ModelSpec(
        MatrixNet, _batched(16), lambda: {"x": {0: Dim("batch", min=1, max=64)}}, _configs))


def perturbed(name: str) -> nn.Module:
    m = eager_model(name)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in m.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g))
    return m


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def torch_loader(path: Path, configs: dict[str, object]):
    """torch's own loader, with the weights a package stores on disk."""
    from torch.export.pt2_archive._package import load_pt2

    disk = configs.get("aot_inductor.package_constants_on_disk_format") == "pickle_weights"
    return load_pt2(path, load_weights_from_disk=disk).aoti_runners["model"]


# --- the proxy executor ----------------------------------------------------------------------

def test_custom_operators_match_eager_and_torch_loader(tmp_path):
    path = compile_model("custom_ops_v1")
    c = open_container(open_model(path, cache_dir=tmp_path))
    try:
        assert c.proxy is not None
        assert c.proxy.targets == ["aioti_tests::scale_add", "aioti_tests::shifted_halves"]
        ref = torch._inductor.aoti_load_package(str(path))
        eager = eager_model("custom_ops_v1")
        for batch in (1, 3, 64):
            x = torch.randn(batch, 8)
            got = c.run([x])
            with torch.no_grad():
                want = eager(x)
            assert len(got) == 2
            assert all(close(g, w) for g, w in zip(got, want))
            assert all(close(g, t) for g, t in zip(got, ref(x)))
    finally:
        c.delete()


@pytest.mark.anyio
async def test_custom_operators_under_concurrency(anyio_backend):
    eager = eager_model("custom_ops_v1")
    xs = [torch.randn(1 + i % 5, 8) for i in range(64)]
    async with aioti.load(compile_model("custom_ops_v1"), workers=2) as model:
        got = await call_all(model, xs)
    with torch.no_grad():
        assert all(all(close(g, w) for g, w in zip(out, eager(x)))  # type: ignore[arg-type]
                   for out, x in zip(got, xs))


@pytest.mark.anyio
async def test_an_operator_that_raises_fails_its_run_only(anyio_backend):
    bad = torch.randn(2, 8)
    bad[0, 0] = float("nan")
    async with aioti.load(compile_model("custom_ops_v1")) as model:
        with pytest.raises(ModelRunError, match=r"aioti_tests::scale_add raised ValueError: "
                                                r"scale_add: y holds NaN") as info:
            await model(bad)
        assert isinstance(info.value.__cause__, ValueError)
        x = torch.randn(2, 8)
        with torch.no_grad():
            want = eager_model("custom_ops_v1")(x)
        assert all(close(g, w) for g, w in zip(await model(x), want))


@pytest.mark.anyio
async def test_torch_operators_without_a_shim_batch(anyio_backend):
    eager = eager_model("torch_ops_without_shim_v1")
    xs = [torch.randn(1 + i % 3, 6, 6) for i in range(48)]
    path = compile_model("torch_ops_without_shim_v1")
    async with aioti.load(path, batching=aioti.Batching(16, 2.0)) as model:
        assert model.container.proxy is not None
        assert model.container.proxy.targets == ["aten::_linalg_eigh", "aten::linalg_qr"]
        got = await call_all(model, xs)
        rows = model.stats()["batching"]["batch_rows"]
    with torch.no_grad():
        assert all(close(g, eager(x)) for g, x in zip(got, xs))  # type: ignore[arg-type]
    assert max(rows) > 3


def test_a_missing_operator_is_named_at_load(tmp_path):
    """A process that has not registered the custom operators: the load fails, naming them."""
    script = textwrap.dedent(f"""
        import aioti, asyncio
        try:
            asyncio.run(aioti.load({str(compile_model("custom_ops_v1"))!r},
                                   cache_dir={str(tmp_path)!r}))
        except aioti.ModelLoadError as exc:
            print("ERROR", exc)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERROR the model calls operators this process does not have" in out.stdout
    assert "aioti_tests::scale_add (a torch.library.custom_op)" in out.stdout
    assert "import the module that defines them" in out.stdout


def test_no_cxx_compiler_names_the_operators(monkeypatch, tmp_path):
    monkeypatch.setenv("AIOTI_CACHE_DIR", str(tmp_path))  # nothing built yet
    monkeypatch.setenv("CXX", "no-such-c++")
    proxy_module._helper.cache_clear()
    try:
        with pytest.raises(ModelLoadError, match=r"aioti_tests::scale_add.*proxy executor.*"
                                                 r"no C\+\+ compiler: none of no-such-c\+\+"):
            open_container(open_model(compile_model("custom_ops_v1")))
    finally:
        proxy_module._helper.cache_clear()


# --- weights outside the library; C++-only packages ------------------------------------------

@pytest.mark.anyio
async def test_a_package_without_weights(anyio_backend, tmp_path):
    path = compile_model("matrix_no_weights_v1")
    eager = eager_model("matrix_no_weights_v1")
    x = torch.randn(3, 16)
    async with aioti.load(path) as model:
        with pytest.raises(ModelRunError, match=r"no weights yet: its package holds none.*"
                                                r"pass weights= to aioti.load.*fc1.weight"):
            await model(x)
        with pytest.raises(InputError, match=r"the first update must give every constant; "
                                             r"missing: \['fc1.bias'"):
            await model.update_constants({"fc1.weight": eager.fc1.weight})
        await model.update_constants(eager.state_dict())
        with torch.no_grad():
            assert close(await model(x), eager(x))
    with pytest.raises(ModelRunError, match="no weights yet"):
        await aioti.load(path, batching=aioti.Batching(8))
    torch.save(eager.state_dict(), tmp_path / "weights.pt")
    async with aioti.load(path, weights=tmp_path / "weights.pt",
                          batching=aioti.Batching(8)) as model:
        with torch.no_grad():
            assert close(await model(x), eager(x))


def test_cpp_only_without_its_compiler(tmp_path):
    src = compile_model("matrix_cpp_only_v1")
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("_compile_flags.json"):
                data = json.dumps({**json.loads(data), "compiler": "no-such-cxx"}).encode()
            zout.writestr(info, data)
    with pytest.raises(ModelLoadError, match=r"C\+\+-only.*needs the C\+\+ compiler "
                                             r"'no-such-cxx'"):
        open_model(bad, cache_dir=tmp_path / "cache")


# --- the compile-option matrix ----------------------------------------------------------------

@pytest.mark.parametrize("row", list(MATRIX))
def test_matrix_matches_torch_loader(row, tmp_path):
    """Each compile option: aioti's core against the eager module and torch's loader."""
    name = f"matrix_{row}_v1"
    path = compile_model(name)
    eager = eager_model(name)
    c = open_container(open_model(path, cache_dir=tmp_path))
    try:
        assert c.buffers.loaded is (row != "no_weights")
        if row == "no_weights":
            c.buffers.update_constants(eager.state_dict())
        x = torch.randn(5, 16)
        with torch.no_grad():
            want = eager(x)
        (got,) = c.run([x])
        assert close(got, want)
        if row not in ("no_weights", "cpp_only"):  # torch's loader: crashes / compiles for long
            ref = torch_loader(path, MATRIX[row])(x)
            assert close(got, ref)
    finally:
        c.delete()


@pytest.mark.anyio
@pytest.mark.parametrize("row", list(MATRIX))
async def test_matrix_serves_batches_and_hot_swaps(row, anyio_backend):
    """Each compile option: concurrent calls, batching, and a hot swap under load with no torn
    output (every output is from the old weights or the new, and the new after the swap)."""
    name = f"matrix_{row}_v1"
    old, new = eager_model(name), perturbed(name)
    weights = old.state_dict() if row == "no_weights" else None
    xs = [torch.randn(1 + i % 4, 16) for i in range(64)]
    with torch.no_grad():
        before = [old(x) for x in xs]
        after = [new(x) for x in xs]
    async with aioti.load(compile_model(name), weights=weights,
                          batching=aioti.Batching(16, 1.0)) as model:
        torn, late = await swap_under_load(model, xs, before, after, new.state_dict(), close)
        assert torn == [] and late == []
        assert all([close(await model(x), a) for x, a in zip(xs, after)])
        assert model.stats()["batching"]["batch_rows"]


def test_info_says_where_the_weights_are(tmp_path):
    for row, says in (("in_library", "in the library"),
                      ("pickle_weights", "stored in the package (torch.save files)"),
                      ("no_weights", "none: pass weights= to aioti.load")):
        out = subprocess.run(
            [sys.executable, "-m", "aioti", "info", str(compile_model(f"matrix_{row}_v1"))],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "AIOTI_CACHE_DIR": str(tmp_path)})
        assert out.returncode == 0, out.stderr[-2000:]
        assert f"weights  {says}" in out.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.anyio
async def test_custom_operators_on_cuda(anyio_backend):
    """The operators run on the worker's stream (its current stream), as the model's kernels."""
    eager = eager_model("custom_ops_v1", "cuda")
    xs = [torch.randn(1 + i % 5, 8, device="cuda") for i in range(32)]
    async with aioti.load(compile_model("custom_ops_v1", "cuda"), device="cuda",
                          workers=2) as model:
        got = await call_all(model, xs)
    with torch.no_grad():
        assert all(all(close(g, w) for g, w in zip(out, eager(x)))  # type: ignore[arg-type]
                   for out, x in zip(got, xs))
