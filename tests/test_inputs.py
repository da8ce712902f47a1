"""The bad-input catalogue: each case raises InputError naming the input, expected and given."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import aioti
from aioti.core import open_container, open_model
from aioti.testing import eager_model

pytestmark = pytest.mark.anyio

X = torch.randn(8, 16)
Y = torch.randn(8, 8)
S = torch.rand(8)

# (case, flat inputs of multi_io, fragments the message must contain)
CASES = [
    ("too few inputs", [X, Y], ["expected 3", "got 2"]),
    ("too many inputs", [X, Y, S, S], ["expected 3", "got 4"]),
    ("wrong dtype", [X.double(), Y, S], ["args[0]", "float32", "float64"]),
    ("wrong rank", [X, Y, S[None]], ["kwargs['scale']", "expected 1 dims", "got 2"]),
    ("wrong static size", [torch.randn(8, 15), Y, S], ["args[0]", "expected size 16", "got 15"]),
    ("dynamic size over max", [torch.randn(65, 16), torch.randn(65, 8), S],
     ["args[0]", "65", "1..64"]),
    ("shared dim mismatch", [X, torch.randn(7, 8), S], ["args[1]", "expected size 8", "got 7"]),
    ("non-contiguous", [torch.randn(16, 8).t(), Y, S], ["args[0]", "strides", "contiguous"]),
    ("non-tensor", [X, 3.0, S], ["args[1]", "torch.Tensor", "float"]),
    ("wrong device", [X.to("meta"), Y, S], ["args[0]", "cpu", "meta"]),
    ("sparse", [X, Y.to_sparse(), S], ["args[1]", "dense", "sparse_coo"]),
    ("sparse csr", [X.to_sparse_csr(), Y, S], ["args[0]", "dense", "sparse_csr"]),
    ("sparse csc", [X, Y.to_sparse_csc(), S], ["args[1]", "dense", "sparse_csc"]),
    ("nested", [X, torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)]), S],
     ["args[1]", "dense", "nested"]),
    ("negative bit", [torch._neg_view(X), Y, S], ["args[0]", "negative bit", "resolve_neg"]),
]


@pytest.fixture(scope="module")
def sync_model(models, tmp_path_factory):
    c = open_container(open_model(models["multi_io"], cache_dir=tmp_path_factory.mktemp("c")))
    yield c
    c.delete()


@pytest.mark.parametrize("case, inputs, fragments", CASES, ids=[c[0] for c in CASES])
def test_core_rejects(sync_model, case, inputs, fragments):
    sync_model.run([X, Y, S])  # accepted first: the bad inputs meet its layout's native guard
    with pytest.raises(aioti.InputError) as info:
        sync_model.run(list(inputs))
    for f in fragments:
        assert f in str(info.value), (f, str(info.value))


def test_accepted_layout_is_guarded_natively(sync_model):
    """The layout accepted last is matched by torch's native tensor guard (the fast path);
    inputs that differ only in what the guard checks beyond the model's needs (requires_grad)
    fall back to the full check and pass."""
    sig = sync_model.signature
    ref = sync_model.run([X, Y, S])
    layout = sig.check([X, Y, S], sync_model.device)
    assert layout is sig._last and layout.guard is not None  # torch 2.11 and 2.13 have it
    assert not layout.guard.check(X.requires_grad_(False).clone().requires_grad_(), Y, S)
    out = sync_model.run([X.clone().requires_grad_(), Y, S])
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


@pytest.mark.parametrize("case, inputs, fragments", CASES, ids=[c[0] for c in CASES])
async def test_async_rejects_and_keeps_serving(models, case, inputs, fragments):
    async with aioti.load(models["multi_io"]) as model:
        with pytest.raises(aioti.InputError) as info:
            await model.run(list(inputs))
        for f in fragments:
            assert f in str(info.value)
        out = await model(X, Y, scale=S)
        ref = eager_model("multi_io")(X, Y, scale=S)
        assert torch.allclose(out["sum"], ref["sum"], atol=1e-5)


def test_batch_one_accepted_on_min_one_dim(sync_model):
    """FACTS: the model's own check rejects batch 1 on a dim exported with min=1."""
    out = sync_model.run([X[:1].clone(), Y[:1].clone(), S])
    ref = eager_model("multi_io")(X[:1], Y[:1], scale=S)
    assert torch.allclose(out[0], ref["sum"], atol=1e-5)


def test_opt_out_checks_only_counts(models, tmp_path):
    c = open_container(open_model(models["small_mlp"], cache_dir=tmp_path), check_inputs=False)
    try:
        with pytest.raises(aioti.InputError, match="wrong number"):
            c.run([])
        c.run([torch.randn(3, 64)])
    finally:
        c.delete()


async def test_pytree_call_errors(models):
    async with aioti.load(models["multi_io"]) as model:
        with pytest.raises(aioti.InputError):
            await model(X, Y, scale=S, extra=S)
        with pytest.raises(aioti.InputError):
            await model(X, Y)


@pytest.mark.parametrize(("inputs", "given"), [
    (X, "got Tensor"), ({"input0": X}, "got dict"), (None, "got NoneType")])
async def test_run_refuses_what_is_not_a_list_of_inputs(models, inputs, given):
    """A tensor would be taken row by row (each row an input), a mapping key by key."""
    async with aioti.load(models["small_mlp"]) as model:
        with pytest.raises(TypeError, match=f"run takes a list of tensors.*{given}"):
            await model.run(inputs)
        assert (await model.run((torch.randn(2, 64),)))[0].shape == (2, 10)  # any sequence


@pytest.mark.parametrize(("timeout", "error"), [
    ("1", TypeError), (True, TypeError), (float("nan"), ValueError)])
async def test_run_refuses_a_timeout_that_is_not_seconds(models, timeout, error):
    async with aioti.load(models["small_mlp"]) as model:
        with pytest.raises(error, match="timeout must be a number of seconds"):
            await model.run([torch.randn(2, 64)], timeout=timeout)
        with pytest.raises(TimeoutError):
            await model.run([torch.randn(2, 64)], timeout=0)


@pytest.fixture(scope="module")
def old_style_signature(models, tmp_path_factory):
    """The signature as read from a torch 2.11 wrapper, which has no assert_size_stride calls."""
    import re

    from aioti.core.signature import input_labels, parse_signature

    files = open_model(models["multi_io"], cache_dir=tmp_path_factory.mktemp("c"))
    source = re.sub(r".*assert_size_stride.*\n", "", files.read_source())
    c = open_container(files)
    try:
        labels = input_labels(c.call_spec[0], 3)
    finally:
        c.delete()
    return parse_signature(source, 3, labels)


@pytest.mark.parametrize("case, inputs, fragments", CASES, ids=[c[0] for c in CASES])
def test_old_style_source_rejects(old_style_signature, case, inputs, fragments):
    with pytest.raises(aioti.InputError) as info:
        old_style_signature.check(list(inputs), torch.device("cpu"))
    assert fragments[0] in str(info.value)
    old_style_signature.check([X, Y, S], torch.device("cpu"))  # valid inputs still pass
    old_style_signature.check([X[:1].clone(), Y[:1].clone(), S], torch.device("cpu"))


def test_conjugate_bit_rejected():
    """A complex input whose conjugate bit is set would be read as its raw storage."""
    from aioti.core.signature import InputSpec, Signature

    sig = Signature([InputSpec(0, "x", "0 (x)", dtype=torch.complex64, sizes=(4,),
                               strides=((1, ()),))], known=True)
    z = torch.randn(4, dtype=torch.complex64)
    sig.check([z], torch.device("cpu"))
    with pytest.raises(aioti.InputError, match="conjugate bit.*resolve_conj"):
        sig.check([z.conj()], torch.device("cpu"))
    sig.check([z.conj().resolve_conj()], torch.device("cpu"))


class Scaled(torch.nn.Module):
    """A model with a non-tensor argument, which export specializes."""

    def forward(self, x: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
        return x * alpha


async def test_a_specialized_non_tensor_argument_warns_once():
    """torch's loader, too, computes with the exported value of a non-tensor argument whatever
    is passed; aioti says so once per model instead of staying silent."""
    import warnings

    from torch.export import Dim

    from aioti.testing import MODELS, ModelSpec, compile_model

    MODELS.setdefault("scaled_v1", ModelSpec(
        Scaled, lambda b: ((torch.randn(b, 4), 0.5), {}),
        lambda: ({0: Dim("batch", min=1, max=64)}, None)))
    x = torch.randn(3, 4)
    async with aioti.load(compile_model("scaled_v1")) as model:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = await model(x, 2.0)
            again = await model(x, 3.0)
        warned = [w for w in caught if "specialized" in str(w.message)]
        assert len(warned) == 1 and "2.0" in str(warned[0].message)
        assert torch.allclose(out, x * 0.5) and torch.allclose(again, x * 0.5)
    info = subprocess.run([sys.executable, "-m", "aioti", "info", str(compile_model("scaled_v1"))],
                          capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr[-2000:]
    assert "non-tensor 1 argument(s) specialized at export" in info.stdout


# (load options, the exception, fragments its message must contain)
BAD_OPTIONS = [
    ({"workers": 0}, ValueError, ["workers", ">= 1", "0"]),
    ({"workers": "2"}, TypeError, ["workers", "an int", "'2'"]),
    ({"threads": 2.5}, TypeError, ["threads", "an int", "2.5"]),
    ({"max_queue": True}, TypeError, ["max_queue", "an int", "True"]),
    ({"max_queue": None}, TypeError, ["max_queue", "an int", "None"]),
    ({"device": 3}, TypeError, ["device", "a device name", "3"]),
    ({"batching": True}, TypeError, ["batching", "aioti.Batching", "True"]),
    ({"cuda_graphs": True}, TypeError, ["cuda_graphs", "aioti.CudaGraphs", "True"]),
    ({"on_full": None}, ValueError, ["on_full", "'wait' or 'raise'", "None"]),
]


@pytest.mark.parametrize(("options", "error", "fragments"), BAD_OPTIONS,
                         ids=[next(iter(o)) + "=" + repr(next(iter(o.values()))) for o, *_ in
                              BAD_OPTIONS])
async def test_bad_load_options_name_what_is_wrong(models, options, error, fragments):
    with pytest.raises(error) as caught:
        await aioti.load(models["small_mlp"], **options)
    for fragment in fragments:
        assert fragment in str(caught.value)


@pytest.mark.parametrize(("make", "fragments"), [
    (lambda: aioti.Batching(max_delay_ms=float("inf")), ["max_delay_ms", "finite", "inf"]),
    (lambda: aioti.Batching(max_delay_ms=float("nan")), ["max_delay_ms", "finite", "nan"]),
    (lambda: aioti.Batching(max_batch_size=1.5), ["max_batch_size", "an int", "1.5"]),
    (lambda: aioti.Batching(dim="0"), ["dim", "an int", "'0'"]),
    (lambda: aioti.CudaGraphs(batch_sizes=(1, 2.0)), ["batch_sizes", "an int", "2.0"]),
    (lambda: aioti.CudaGraphs(max_memory_mb=float("inf")), ["max_memory_mb", "finite", "inf"]),
    (lambda: aioti.CudaGraphs(warmup=0), ["warmup", ">= 1", "0"]),
])
def test_bad_option_values_name_what_is_wrong(make, fragments):
    """A delay of inf once crashed the worker that waited on it (OverflowError)."""
    with pytest.raises((TypeError, ValueError)) as caught:
        make()
    for fragment in fragments:
        assert fragment in str(caught.value)
