"""The synchronous core against its oracles: torch's own loader and the eager modules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree

import aioti
from aioti.core import Container, ModelLibrary, list_models, open_container, open_model
from aioti.testing import eager_model, example_inputs


def flat(name: str, batch: int = 8, seed: int = 1) -> list[torch.Tensor]:
    args, kwargs = example_inputs(name, batch, seed=seed)
    return list(args) + list(kwargs.values())


def eager_flat(name: str, batch: int = 8, seed: int = 1, module: torch.nn.Module | None = None):
    args, kwargs = example_inputs(name, batch, seed=seed)
    with torch.no_grad():
        return pytree.tree_leaves((module or eager_model(name))(*args, **kwargs))


def needs(c: Container, fn: str) -> None:
    """Skip where the library (built by another torch) lacks a native function."""
    if not c.library.has(fn):
        pytest.skip(f"the model library lacks {fn} (torch {torch.__version__})")


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.allclose(x, y, atol=1e-5, rtol=1e-4)
        for x, y in zip(a, b)
    )


@pytest.fixture
def container(models, tmp_path):
    made = []

    def make(name: str, **kw) -> Container:
        c = open_container(open_model(models[name], cache_dir=tmp_path), **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.delete()


@pytest.mark.parametrize("name", ["small_mlp", "multi_io", "folding", "buffers", "blob"])
def test_run_matches_eager_and_torch_loader(container, models, name):
    c = container(name)
    out = c.run(flat(name))
    assert same(out, eager_flat(name))
    args, kwargs = example_inputs(name)
    ref = torch._inductor.aoti_load_package(str(models[name]))(*args, **kwargs)
    assert same(out, pytree.tree_leaves(ref))


def test_boxed_run_empties_inputs(container):
    c = container("small_mlp")
    inputs = flat("small_mlp")
    out = c.boxed_run(inputs)
    assert inputs == []
    assert same(out, eager_flat("small_mlp"))


def test_metadata(container):
    c = container("multi_io")
    assert (c.num_inputs, c.num_outputs) == (3, 3)
    assert len(c.input_names) == 3 and len(c.output_names) == 3
    in_spec, out_spec = c.call_spec
    assert pytree.treespec_loads(in_spec).num_leaves == 3
    assert pytree.treespec_loads(out_spec).num_leaves == 3
    assert c.constant_fqns == {"proj_weight": "proj.weight"}
    assert c.constant_dtypes == {"proj_weight": torch.float32}
    assert c.constant_sizes == {"proj_weight": 8 * 16 * 4}
    assert c.folded_constants == {"proj_weight": False}


def test_folded_flags(container):
    c = container("folding")
    assert any(c.folded_constants.values())
    assert set(c.constant_fqns.values()) == {"w", "b"}  # folded ones are not updatable


def test_symbols_recorded(container):
    lib = container("small_mlp").library
    assert "AOTInductorModelContainerRun" in lib.available
    for name in ("UpdateUserManagedConstantBufferPairs", "SwapConstantBuffer", "GetCallSpec",
                 "RunConstantFolding", "GetConstantsBlobSize"):
        assert lib.has(name), name  # present in torch 2.11 and 2.13 alike
    if torch.__version__.startswith("2.13"):
        assert lib.missing == frozenset()  # torch 2.13 exports every function aioti knows
    elif torch.__version__.startswith("2.11"):  # FACTS: what torch 2.11 lacks
        assert {"AOTInductorGetLastError", "AOTInductorModelContainerUpdateConstantBufferPairs",
                "AOTInductorModelContainerExtractConstantsMapEntries"} <= lib.missing
    # other versions (2.14 and later): only the functions every version has, checked above


def test_concurrent_runs_from_threads(container):
    c = container("small_mlp", num_models=4)
    errors = []
    x = flat("small_mlp")
    ref = eager_flat("small_mlp")

    def work() -> None:
        for _ in range(200):
            if not same(c.run(x), ref):
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)


def test_single_threaded_mode(container):
    c = container("small_mlp", single_threaded=True)
    assert same(c.run(flat("small_mlp")), eager_flat("small_mlp"))


# --- constants ---------------------------------------------------------------------------------

def perturbed(name: str, seed: int = 5) -> torch.nn.Module:
    m = eager_model(name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in m.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g))
    return m


def test_extract_constants(container):
    c = container("buffers")
    needs(c, "ExtractConstantsMapEntries")
    got = c.buffers.extract_constants()
    sd = eager_model("buffers").state_dict()
    assert set(got) == set(c.constant_fqns)
    for name, t in got.items():
        assert torch.equal(t, sd[c.constant_fqns[name]])
    assert set(c.buffers.extract_constants(by_fqn=True)) == set(sd)


@pytest.mark.parametrize("by", ["fqn", "name"])
def test_update_active_matches_eager(container, by):
    c = container("buffers")
    m = perturbed("buffers")
    sd = m.state_dict()
    mapping = sd if by == "fqn" else {n: sd[f] for n, f in c.constant_fqns.items()}
    c.buffers.update_constants(mapping, validate_full=True)
    assert same(c.run(flat("buffers")), eager_flat("buffers", module=m))


def test_update_user_managed(container):
    c = container("buffers")
    m = perturbed("buffers")
    c.buffers.update_constants(m.state_dict(), user_managed=True)
    assert same(c.run(flat("buffers")), eager_flat("buffers", module=m))


def test_inactive_update_swap_rollback_free(container):
    c = container("buffers")
    needs(c, "ExtractConstantsMapEntries")
    old = eager_flat("buffers")
    m = perturbed("buffers")
    with pytest.raises(aioti.InputError, match="swap refused"):
        c.buffers.swap_constants()  # nothing complete in the inactive buffer yet
    c.buffers.update_inactive_constants({"fc.weight": m.state_dict()["fc.weight"]})  # completed from active
    assert same(c.run(flat("buffers")), old)  # still the active weights
    c.buffers.swap_constants()
    expect = eager_model("buffers")
    expect.fc.weight.data.copy_(m.fc.weight.data)
    assert same(c.run(flat("buffers")), eager_flat("buffers", module=expect))
    c.buffers.swap_constants()  # roll back
    assert same(c.run(flat("buffers")), old)
    c.buffers.free_inactive_constants()
    with pytest.raises(aioti.InputError):
        c.buffers.swap_constants()


def test_fold_after_update(container):
    c = container("folding")
    m = perturbed("folding")
    c.buffers.update_constants(m.state_dict())
    c.buffers.fold_constants()
    assert same(c.run(flat("folding")), eager_flat("folding", module=m))
    m2 = perturbed("folding", seed=9)
    c.buffers.update_constants(m2.state_dict(), inactive=True)
    c.buffers.fold_constants(inactive=True)
    c.buffers.swap_constants()
    assert same(c.run(flat("folding")), eager_flat("folding", module=m2))


def test_fold_without_folded_constants_is_a_no_op(container, capfd):
    c = container("buffers")
    c.buffers.fold_constants()
    c.buffers.fold_constants(inactive=True)
    assert same(c.run(flat("buffers")), eager_flat("buffers"))
    assert "WARNING" not in capfd.readouterr().err  # the library's own complaint, skipped


def test_free_of_a_folded_inactive_buffer_is_refused(container):
    """torch's container resets a freed buffer's folded constants to null handles and reads one
    on that buffer's next update (a segfault): such a free is refused, a safe one is not."""
    c = container("folding")
    m = perturbed("folding")
    with pytest.raises(aioti.InputError, match="fold refused"):
        c.buffers.fold_constants(inactive=True)  # nothing there yet: natively, a segfault
    c.buffers.update_constants(m.state_dict(), inactive=True)  # buffer 1: updated, never folded
    c.buffers.free_inactive_constants()  # safe: freed
    with pytest.raises(aioti.InputError, match="fold refused"):
        c.buffers.fold_constants(inactive=True)  # natively: folds freed memory
    c.buffers.update_constants(m.state_dict(), inactive=True)
    c.buffers.fold_constants(inactive=True)
    c.buffers.swap_constants()
    assert same(c.run(flat("folding")), eager_flat("folding", module=m))
    c.buffers.swap_constants()  # the first buffer, folded by the first run, is inactive again
    with pytest.raises(aioti.UnsupportedOperation, match="runtime-folded"):
        c.buffers.free_inactive_constants()
    c.buffers.swap_constants()
    with pytest.raises(aioti.UnsupportedOperation, match="runtime-folded"):
        c.buffers.free_inactive_constants()
    m2 = perturbed("folding", seed=9)
    c.buffers.update_constants(m2.state_dict(), inactive=True)  # what crashed after a free
    c.buffers.fold_constants(inactive=True)
    c.buffers.swap_constants()
    assert same(c.run(flat("folding")), eager_flat("folding", module=m2))


@pytest.mark.parametrize(
    "mapping, match",
    [
        ({"nope": torch.zeros(1)}, "unknown constant"),
        ({"fc.weight": torch.zeros(16, 16, dtype=torch.float64)}, "expected dtype"),
        ({"fc.weight": torch.zeros(4, 4)}, "expected shape"),
        ({"fc.weight": 3.0}, "expected a torch.Tensor"),
        ({"fc.weight": torch.zeros(16, 16).to_sparse()}, "dense tensor with data, got layout"),
        ({"fc.weight": torch.empty(16, 16, device="meta")}, "a meta tensor"),
    ],
)
def test_bad_constants_change_nothing(container, mapping, match):
    c = container("buffers")
    needs(c, "ExtractConstantsMapEntries")
    before = c.buffers.extract_constants()
    with pytest.raises(aioti.InputError, match=match):
        c.buffers.update_constants(mapping)
    after = c.buffers.extract_constants()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_validate_full_reports_missing(container):
    c = container("buffers")
    with pytest.raises(aioti.InputError, match="missing"):
        c.buffers.update_constants({"fc.weight": torch.zeros(16, 16)}, validate_full=True)


def test_weights_blob(container, models, tmp_path):
    c = container("blob")  # constants live outside the .so: loaded from the package's blob
    assert same(c.run(flat("blob")), eager_flat("buffers"))
    files = open_model(models["blob"], cache_dir=tmp_path)
    assert files.blob is not None and files.blob.stat().st_size >= c.buffers.constants_blob_size
    c.buffers.load_constants_from_blob(files.blob)
    assert same(c.run(flat("blob")), eager_flat("buffers"))
    with pytest.raises(aioti.InputError, match="at least"):
        c.buffers.load_constants_from_blob(b"\0" * 3)
    m = perturbed("buffers")  # a blob of other weights, in constant order
    sd = m.state_dict()
    blob = b"".join(bytes(sd[x.fqn].contiguous().view(torch.uint8).flatten().tolist())
                    for x in c.constants)
    c.buffers.load_constants_from_blob(blob)
    assert same(c.run(flat("blob")), eager_flat("buffers", module=m))


# --- packages ----------------------------------------------------------------------------------

def test_two_model_package(models, tmp_path):
    path = models["two_models"]
    assert list_models(path) == ["model", "second"]
    for name, oracle in (("model", "small_mlp"), ("second", "second")):
        c = open_container(open_model(path, name, cache_dir=tmp_path))
        try:
            assert same(c.run(flat(oracle)), eager_flat(oracle))
        finally:
            c.delete()
    with pytest.raises(aioti.ModelLoadError, match="no model 'third'.*model, second"):
        open_model(path, "third", cache_dir=tmp_path)


def test_bare_library(models, tmp_path):
    files = open_model(models["small_mlp"], cache_dir=tmp_path)
    bare = open_model(files.library)
    assert bare.source is not None
    c = open_container(bare)
    try:
        assert same(c.run(flat("small_mlp")), eager_flat("small_mlp"))
        with pytest.raises(aioti.InputError):
            c.run([torch.zeros(8, 65)])
    finally:
        c.delete()


def test_partial_updates_change_only_what_they_name(container):
    """torch's container fills the module buffers missing from a partial update of the inactive
    buffer with the *active* buffer's (after a swap: new weights, old buffers, in silence).
    aioti passes the inactive buffer's own values; `stage_constants` (a partial hot swap)
    applies a mapping to the current, active weights."""
    c = container("buffers")
    needs(c, "ExtractConstantsMapEntries")
    x = flat("buffers")

    def expect(sd):
        m = eager_model("buffers")
        m.load_state_dict(sd)
        return eager_flat("buffers", module=m)

    new = {k: v + 1 for k, v in eager_model("buffers").state_dict().items()}
    c.buffers.update_constants(new, inactive=True)
    c.buffers.update_constants({"fc.weight": new["fc.weight"] * 2}, inactive=True)
    new["fc.weight"] = new["fc.weight"] * 2
    assert torch.equal(c.buffers.extract_constants(inactive=True, by_fqn=True)["scale"], new["scale"])
    c.buffers.swap_constants()
    assert same(c.run(x), expect(new))
    # Active: user-managed, then one constant copied over it; stage a change of another.
    own = {k: v * 0.5 for k, v in new.items()}
    c.buffers.update_constants(own, user_managed=True)
    w = torch.randn(16, 16)
    c.buffers.update_constants({"fc.weight": w})
    c.buffers.stage_constants({"scale": own["scale"] + 3})
    c.buffers.swap_constants()
    assert same(c.run(x), expect({**own, "fc.weight": w, "scale": own["scale"] + 3}))


def test_a_freed_inactive_buffer_extracts_empty(container):
    """Natively its entries still point into the freed blob: garbage for a small model, a
    segfault for one whose blob is unmapped on free."""
    c = container("buffers")
    needs(c, "ExtractConstantsMapEntries")
    assert c.buffers.extract_constants(inactive=True) == {}
    c.buffers.update_constants(perturbed("buffers").state_dict(), inactive=True)
    assert set(c.buffers.extract_constants(inactive=True)) == set(c.buffers.extract_constants())
    c.buffers.free_inactive_constants()
    assert c.buffers.extract_constants(inactive=True) == {}


def test_partial_input_checks_are_announced(models, tmp_path):
    """A wrapper source aioti cannot read (a new torch's generated code, say) must not turn
    the input checks off silently."""
    src = zipfile.ZipFile(models["small_mlp"])
    damaged = tmp_path / "damaged.pt2"
    with zipfile.ZipFile(damaged, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            out.writestr(info.filename, b"// nothing" if info.filename.endswith(
                ".wrapper.cpp") else data)
    with pytest.warns(RuntimeWarning, match=r"partial.*shapes of 0 \(args\[0\]\)"):
        c = open_container(open_model(damaged, cache_dir=tmp_path / "c"))
    try:
        assert same(c.run(flat("small_mlp")), eager_flat("small_mlp"))
    finally:
        c.delete()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_container(open_model(models["small_mlp"], cache_dir=tmp_path / "c2")).delete()


def test_unwritable_cache_dir(models, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(aioti.ModelLoadError, match="writable directory"):
        open_model(models["small_mlp"], cache_dir=blocker / "cache")


def test_cache_reused_and_safe_under_concurrency(models, tmp_path):
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(
        open_model(models["small_mlp"], cache_dir=tmp_path).library)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(set(paths)) == 1
    mtime = paths[0].stat().st_mtime_ns
    assert open_model(models["small_mlp"], cache_dir=tmp_path).library.stat().st_mtime_ns == mtime
    assert not [p for p in Path(tmp_path).rglob(".tmp-*")]


def test_bad_packages(models, tmp_path):
    truncated = tmp_path / "trunc.pt2"
    truncated.write_bytes(Path(models["small_mlp"]).read_bytes()[:5000])
    text = tmp_path / "text.pt2"
    text.write_text("hello")
    empty = tmp_path / "empty.pt2"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("x/other.txt", "nothing")
    for path, match in ((truncated, "not a .pt2"), (text, "not a .pt2"), (empty, "no AOTInductor"),
                        (tmp_path / "missing.pt2", "does not exist"), ("", "an empty one")):
        with pytest.raises(aioti.ModelLoadError, match=match):
            open_model(path, cache_dir=tmp_path / "c")
    notlib = tmp_path / "fake.so"
    notlib.write_bytes(b"\x7fELF garbage")
    with pytest.raises(aioti.ModelLoadError, match="cannot open"):
        ModelLibrary(notlib)


def test_truncated_library_is_refused_not_a_crash(models, tmp_path):
    """A model library cut short inside a valid zip: before the check, creating its container
    died of SIGBUS when its constants were first touched. Run in a child process."""
    src = Path(models["small_mlp"])
    script = textwrap.dedent(f"""
        import zipfile, sys
        from pathlib import Path
        import aioti
        from aioti.core import open_container, open_model
        src, tmp = Path({str(src)!r}), Path({str(tmp_path)!r})
        with zipfile.ZipFile(src) as zf:
            lib = next(i for i in zf.infolist() if i.filename.endswith(".wrapper.so"))
            data = zf.read(lib)
            for k in (1, 5, 9):
                path = tmp / f"cut{{k}}.pt2"
                with zipfile.ZipFile(path, "w") as out:
                    for info in zf.infolist():
                        out.writestr(info.filename, data[:len(data) * k // 10] if info is lib
                                     else zf.read(info))
                try:
                    open_container(open_model(path, cache_dir=tmp / "c"))
                except aioti.ModelLoadError as exc:
                    assert "truncated or damaged" in str(exc), exc
                else:
                    sys.exit(f"cut {{k}}/10 loaded")
        print("REFUSED")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "REFUSED" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_cpu_isa_the_host_lacks_is_refused(monkeypatch):
    from aioti.core import package

    monkeypatch.setattr(package, "cpu_flags", lambda: {"sse2", "avx2", "fma"})
    package._check_cpu_isa({"AOTI_CPU_ISA": "AVX2"}, "m")  # has it
    package._check_cpu_isa({"AOTI_CPU_ISA": "SOMETHING_NEW"}, "m")  # unknown words pass
    with pytest.raises(aioti.ModelLoadError, match="compiled for CPUs with AVX512.*lacks avx512f"):
        package._check_cpu_isa({"AOTI_CPU_ISA": "AVX512 AVX512_VNNI"}, "m")
    assert package.cpu_flags is not None


def test_foreign_platform_refused(models, tmp_path):
    src = open_model(models["small_mlp"], cache_dir=tmp_path)
    d = tmp_path / "foreign"
    shutil.copytree(src.library.parent, d)
    for meta in d.glob("*metadata.json"):
        meta.write_text('{"AOTI_PLATFORM": "linux", "AOTI_MACHINE": "riscv64"}')
    with pytest.raises(aioti.ModelLoadError, match="built for linux/riscv64"):
        open_model(d / src.library.name)


def test_unsupported_operation_names_symbol(container):
    c = container("small_mlp")
    c.library.functions.pop("ExtractConstantsMapEntries", None)  # as in a torch 2.11 library
    with pytest.raises(aioti.UnsupportedOperation, match="ExtractConstantsMapEntries"):
        c.buffers.extract_constants()


def test_copying_update_falls_back_to_user_managed(container):
    c = container("buffers")
    c.library.functions.pop("UpdateConstantBufferPairs", None)  # as in a torch 2.11 library
    m = perturbed("buffers")
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    c.buffers.update_constants(sd)
    for t in sd.values():
        t.zero_()  # the model holds a private copy, not the caller's tensors
    assert same(c.run(flat("buffers")), eager_flat("buffers", module=m))


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_no_leak_over_100k_runs(container):
    c = container("small_mlp")
    good = torch.randn(8, 64)
    bad = torch.randn(8, 65)

    def burst(n: int) -> None:
        for i in range(n):
            if i % 4 == 3:
                with pytest.raises(aioti.InputError):
                    c.run([bad])
            elif i % 4 == 2:
                c.boxed_run([good.clone()])
            else:
                c.run([good])

    burst(10_000)  # warm allocator and caches
    before = _rss_kib()
    burst(100_000)
    grown = _rss_kib() - before
    # A leaked input or output handle per run would be >= 100k * 2 KiB = 200 MB.
    assert grown < 20_000, f"RSS grew by {grown} KiB over 100k runs"


def test_native_failure_carries_the_runtime_message(container):
    """A non-zero return becomes ModelRunError with the library's own reason (torch 2.13 has
    AOTInductorGetLastError) or the function, model and code (older libraries)."""
    import ctypes

    from aioti.core.library import ConstantEntry

    c = container("buffers")
    empty = (ConstantEntry * 1)()
    with pytest.raises(aioti.ModelRunError) as info:
        # validate_full with no constants: the native container throws.
        c.library.call("UpdateUserManagedConstantBufferPairs", c._live(), empty, 0, False, True)
    msg = str(info.value)
    assert "UpdateUserManagedConstantBufferPairs failed with code" in msg
    assert c.library.path.name in msg
    if c.library.has("AOTInductorGetLastError"):
        assert "gives no reason" not in msg
    assert ctypes.sizeof(ConstantEntry) == 16
    assert same(c.run(flat("buffers")), eager_flat("buffers"))  # the model still works


def test_no_leak_when_the_library_rejects_before_taking_inputs(models, tmp_path):
    """With AOTI_RUNTIME_CHECK_INPUTS=1 the library checks inputs before it takes them over;
    a rejected run (batch 1 on a min=1 dim, which its check refuses) must not leak them."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import torch, aioti
        from aioti.core import open_container, open_model
        c = open_container(open_model({str(models['small_mlp'])!r}, cache_dir={str(tmp_path)!r}))
        x = torch.randn(1, 64)
        count = lambda: torch._C._storage_Use_Count(x.untyped_storage()._cdata)
        before = count()
        for _ in range(200):
            try:
                c.run([x])
            except aioti.ModelRunError as exc:
                assert "too small" in str(exc) or "gives no reason" in str(exc), exc  # 2.11: no message
            else:
                raise SystemExit("the library's own check did not reject batch 1")
        assert count() == before, (before, count())
        assert c.run([torch.randn(2, 64)])[0].shape == (2, 10)
        c.delete()
        print("ok")
    """)
    env = {**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("native", [True, False], ids=["native", "per-run"])
def test_run_many_matches_single_runs(container, monkeypatch, native):
    """A worker's chunk of runs in one call gives each run's own outputs (mixed batch sizes, a
    wrong input count failing alone), through the native helper and without it."""
    from aioti.core import runmany

    assert runmany.status() == "native"  # gcc is on every machine this suite runs on
    if not native:
        monkeypatch.setattr(runmany, "runner", lambda: None)
    c = container("multi_io")
    assert (c._run_many_fn is not None) == native
    batch = [flat("multi_io", b, seed=b) for b in (1, 3, 8, 2)]
    batch.insert(2, flat("multi_io", 4)[:-1])
    out = c.run_many(batch)
    assert isinstance(out[2], aioti.InputError) and "expected 3, got 2" in str(out[2])
    for got, b in zip(out[:2] + out[3:], (1, 3, 8, 2)):
        assert same(got, eager_flat("multi_io", b, seed=b))
    assert c.run_many([]) == []
    other = container("small_mlp")
    other.delete()
    with pytest.raises(aioti.ClosedError):
        other.run_many([[torch.randn(2, 64)]])


@pytest.mark.parametrize("native", ["1", "0"], ids=["native", "per-run"])
def test_run_many_isolates_a_native_failure(models, tmp_path, native):
    """A run the library rejects (its own input check: batch 1 on a min=1 dim) fails alone;
    the runs after it still run, and no input or output handle leaks."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import torch, aioti
        from aioti.core import open_container, open_model, runmany
        assert runmany.status() == ("native" if {native!r} == "1" else
                                    "disabled by AIOTI_NATIVE=0"), runmany.status()
        c = open_container(open_model({str(models['small_mlp'])!r}, cache_dir={str(tmp_path)!r}))
        x, y = torch.randn(1, 64), torch.randn(3, 64)
        count = lambda t: torch._C._storage_Use_Count(t.untyped_storage()._cdata)
        before = count(x), count(y)
        for _ in range(200):
            out = c.run_many([[y], [x], [y], [x]])
            assert [type(o).__name__ for o in out] == ["list", "ModelRunError"] * 2, out
            assert out[0][0].shape == (3, 10) and torch.equal(out[0][0], out[2][0])
            del out
        assert (count(x), count(y)) == before, (before, count(x), count(y))
        c.delete()
        print("ok")
    """)
    env = {**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1", "AIOTI_NATIVE": native}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_native_helper_without_a_compiler(tmp_path):
    """No C compiler: runs fall back to one ctypes call each, and `status()` says why."""
    import subprocess
    import sys

    code = ("from aioti.core import runmany; assert runmany.runner() is None; "
            "print(runmany.status())")
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "AIOTI_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no C compiler" in proc.stdout and "no-such-cc" in proc.stdout


CONSTANT_SEQUENCES = """
import random, sys
import aioti
from aioti.core import open_container, open_model
from aioti.testing import eager_model, example_inputs
path, name, seed, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
files = open_model(path)
sd = eager_model(name).state_dict()
first = next(iter(sd))
args, kwargs = example_inputs(name, 4)
ops = {
    "update": lambda c: c.buffers.update_constants(sd),
    "update inactive": lambda c: c.buffers.update_constants(sd, inactive=True),
    "update inactive, one constant": lambda c: c.buffers.update_constants({first: sd[first]}, inactive=True),
    "update inactive, user-managed": lambda c: c.buffers.update_constants(
        {k: v.clone() for k, v in sd.items()}, inactive=True, user_managed=True),
    "extract": lambda c: c.buffers.extract_constants(),
    "extract inactive": lambda c: c.buffers.extract_constants(inactive=True),
    "fold": lambda c: c.buffers.fold_constants(),
    "fold inactive": lambda c: c.buffers.fold_constants(inactive=True),
    "swap": lambda c: c.buffers.swap_constants(),
    "free inactive": lambda c: c.buffers.free_inactive_constants(),
    "run": lambda c: c.run(list(args) + list(kwargs.values())),
}
rnd = random.Random(seed)
for i in range(count):
    seq = [rnd.choice(list(ops)) for _ in range(rnd.randint(3, 12))]
    print("sequence", seq, flush=True)
    c = open_container(files)
    for op in seq:
        try:
            ops[op](c)
        except aioti.AiotiError:
            pass  # refused with a reason: fine; a crash is not
    c.delete()
print("done", flush=True)
"""


@pytest.mark.parametrize("name", ["folding", "buffers", "mid_mlp"])
def test_random_constant_operation_sequences_never_crash(models, name):
    """80 random sequences of constant operations and runs, each on a fresh container, in a
    child process. Found this way, and refused since with a reason: freeing a buffer that holds
    folded constants, then updating it; folding an empty or freed inactive buffer (about a
    third of such sequences crashed the folding model's library); extracting a freed inactive
    buffer (it read the freed blob: garbage for a small model, a segfault for the mid MLP,
    whose blob is unmapped when freed)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", CONSTANT_SEQUENCES, str(models[name]), name, "7", "80"],
        capture_output=True, text=True, timeout=240)
    last = [ln for ln in proc.stdout.splitlines() if ln.startswith("sequence")][-1:]
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("done"), (
        f"exit {proc.returncode} during {last}: {proc.stderr[-1500:]}")


@pytest.mark.parametrize("name", ["folding", "buffers"])
def test_constant_operations_against_a_model_of_the_buffers(models, name):
    """100 random sequences of constant operations, checked step by step against a Python model
    of the two buffers: runs against the eager module holding the expected active weights,
    extracts against the expected contents. (Found: partial inactive updates took the module
    buffers of the active buffer; partial hot swaps applied to stale weights.)"""
    import random

    files = open_model(models[name])
    base = eager_model(name).state_dict()
    sets = [{k: v + 0.1 * s * torch.randn(v.shape, generator=torch.Generator().manual_seed(s))
             for k, v in base.items()} for s in range(3)]
    rnd = random.Random(11)
    ops = ["update", "update one", "update inactive", "update inactive one", "swap", "free",
           "fold", "fold inactive", "run", "extract", "extract inactive", "hot swap",
           "hot swap one", "user-managed inactive", "user-managed one"]
    for _ in range(100):
        c = open_container(files)
        needs(c, "ExtractConstantsMapEntries")
        active, inactive = dict(base), None
        done = []
        try:
            for _ in range(rnd.randint(3, 14)):
                op, w = rnd.choice(ops), sets[rnd.randrange(3)]
                k = rnd.choice(list(w))
                done.append(op)
                if op == "update":
                    c.buffers.update_constants(w)
                    active = dict(w)
                elif op == "update one":
                    c.buffers.update_constants({k: w[k]})
                    active[k] = w[k]
                elif op == "update inactive":
                    c.buffers.update_constants(w, inactive=True)
                    inactive = dict(w)
                elif op == "update inactive one":
                    c.buffers.update_constants({k: w[k]}, inactive=True)
                    inactive = {**(active if inactive is None else inactive), k: w[k]}
                elif op == "user-managed inactive":
                    c.buffers.update_constants({q: v.clone() for q, v in w.items()}, inactive=True,
                                       user_managed=True)
                    inactive = dict(w)
                elif op == "user-managed one":
                    c.buffers.update_constants({k: w[k].clone()}, user_managed=True)
                    active[k] = w[k]
                elif op.startswith("hot swap"):
                    m = dict(w) if op == "hot swap" else {k: w[k]}
                    c.buffers.stage_constants(m)
                    c.buffers.fold_constants(inactive=True)
                    c.buffers.swap_constants()
                    active, inactive = {**active, **m}, active
                elif op == "swap":
                    if inactive is None:
                        with pytest.raises(aioti.InputError, match="swap refused"):
                            c.buffers.swap_constants()
                    else:
                        c.buffers.swap_constants()
                        active, inactive = inactive, active
                elif op == "free":
                    try:
                        c.buffers.free_inactive_constants()
                        inactive = None
                    except aioti.UnsupportedOperation:
                        pass  # it holds folded constants: kept
                elif op == "fold":
                    c.buffers.fold_constants()
                elif op == "fold inactive":
                    if inactive is None and name == "folding":
                        with pytest.raises(aioti.InputError, match="fold refused"):
                            c.buffers.fold_constants(inactive=True)
                    else:
                        c.buffers.fold_constants(inactive=True)
                elif op == "run":
                    m = eager_model(name)
                    m.load_state_dict(active)
                    assert same(c.run(flat(name)), eager_flat(name, module=m))
                else:
                    got = c.buffers.extract_constants(inactive=op == "extract inactive", by_fqn=True)
                    want = active if op == "extract" else (inactive or {})
                    assert set(got) == set(want)
                    assert all(torch.equal(got[q], want[q]) for q in want)
        except AssertionError as exc:
            raise AssertionError(f"after {done}: {exc}") from exc
        finally:
            c.delete()
