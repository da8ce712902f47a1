"""Reading `.pt2` packages and the content-addressed extraction cache.

A package is a zip archive holding, per model, `<prefix>/data/aotinductor/<model>/` with the
model library (`*.wrapper.so`), its source (`*.wrapper.cpp`, from which input checks are read),
metadata (`*_metadata.json`), and optionally: constants kept outside the library (a
`*_weights.blob`, or `weights_config.json` naming `torch.save`d tensors in
`<prefix>/data/weights/`), kernel binaries (`*.cubin`), the operator calls of a proxy executor
(`*.wrapper.json`), or - in a C++-only package - sources and build options instead of the library
(`build.py` builds it). Only the standard library reads it.

Extraction goes to `<cache>/<sha256 of the package>/`: a second load of the same bytes reuses
it, and concurrent extractions (threads or processes) each write a private temporary directory
and rename it into place, so no reader ever sees a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError
from .build import build_library, is_cpp_only

__all__ = ["ModelFiles", "check_package", "cpu_flags", "default_cache_dir", "discard",
           "list_models", "open_model", "package_path"]

_MARK = "/data/aotinductor/"
_WEIGHTS = "/data/weights/"


def default_cache_dir() -> Path:
    """`$AIOTI_CACHE_DIR`, else `$XDG_CACHE_HOME/aioti/packages`, else `~/.cache/aioti/packages`."""
    if env := os.environ.get("AIOTI_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aioti" / "packages"


@dataclass
class ModelFiles:
    """The files of one model, on disk."""

    name: str
    library: Path
    source: Path | None = None
    blob: Path | None = None
    cubin_dir: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    package: Path | None = None
    #: the cache directory this load extracted (None: it was there already, or a bare library)
    extracted: Path | None = None
    #: the operator calls the library makes through a proxy executor (`proxy.extern_nodes`)
    extern_json: Path | None = None
    #: `weights_config.json`: constants stored as `torch.save`d tensors (`weights/` beside it)
    weights_config: Path | None = None

    def read_source(self) -> str | None:
        return self.source.read_text(errors="replace") if self.source else None


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.is_file():
        raise ModelLoadError(f"{str(path)!r} does not exist or is not a file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(
            f"{str(path)!r} is not a .pt2 package (not a readable zip archive: {exc})"
        ) from exc


def _models_in(zf: zipfile.ZipFile) -> dict[str, list[tuple[zipfile.ZipInfo, str]]]:
    """Per model, its archive members and their names in its cache directory."""
    models: dict[str, list[tuple[zipfile.ZipInfo, str]]] = {}
    for info in zf.infolist():
        _, mark, rest = info.filename.partition(_MARK)
        if mark and "/" in rest and not info.is_dir():
            model, name = rest.split("/", 1)
            models.setdefault(model, []).append((info, name))
    return models


def _weights_in(zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, str]]:
    """The package's stored weights (`data/weights/*`), shared by its models."""
    return [(info, info.filename.partition(_WEIGHTS)[2]) for info in zf.infolist()
            if _WEIGHTS in info.filename and not info.is_dir()]


def list_models(path: str | os.PathLike[str]) -> list[str]:
    """Names of the AOTInductor models in a package."""
    with _open_zip(Path(path)) as zf:
        return sorted(_models_in(zf))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _extract(zf: zipfile.ZipFile, members: list[tuple[zipfile.ZipInfo, str]], dest: Path
             ) -> None:
    """Write `members` (archive entry, name under `dest`) into `dest`, unless it exists."""
    if dest.is_dir() or not members:
        return
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest.parent))
    except OSError as exc:
        raise ModelLoadError(
            f"cannot extract the package into {str(dest.parent)!r}: {exc} (point "
            "AIOTI_CACHE_DIR, or cache_dir=, at a writable directory)"
        ) from exc
    try:
        for info, name in members:
            target = tmp / name
            if ".." in Path(name).parts:
                raise ModelLoadError(f"package entry {info.filename!r} escapes its directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():  # lost a race only if the winner's copy is there
                raise
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise ModelLoadError(f"cannot extract {members[0][0].filename!r}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_platform(meta: dict[str, str], where: str) -> None:
    want = meta.get("AOTI_PLATFORM"), meta.get("AOTI_MACHINE")
    have = platform.system().lower(), platform.machine()
    if want[0] and want[0] != have[0] or want[1] and want[1] != have[1]:
        raise ModelLoadError(
            f"{where} was built for {want[0]}/{want[1]}, this machine is {have[0]}/{have[1]}"
        )


#: AOTI_CPU_ISA words (torch's vector ISAs) -> the /proc/cpuinfo flags each needs
_ISA_FLAGS = {
    "AVX2": ("avx2", "fma"),
    "AVX512": ("avx512f", "avx512bw", "avx512dq"),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
    "AVX512_FP16": ("avx512_fp16",),
    "AMX_TILE": ("amx_tile",),
    "AMX_BF16": ("amx_bf16",),
    "AMX_INT8": ("amx_int8",),
    "NEON": ("asimd",),
    "SVE": ("sve",),
    "SVE256": ("sve",),
}


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags (Linux's /proc/cpuinfo), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def _check_cpu_isa(meta: dict[str, str], where: str) -> None:
    """Refuse a model compiled for vector instructions this CPU lacks: its kernels would die
    of an illegal instruction at the first run."""
    isa = meta.get("AOTI_CPU_ISA", "")
    if not isa or (flags := cpu_flags()) is None:
        return
    for word in isa.replace(",", " ").upper().split():
        lacking = [f for f in _ISA_FLAGS.get(word, ()) if f not in flags]
        if lacking:
            raise ModelLoadError(
                f"{where} was compiled for CPUs with {word} ({isa}); this CPU lacks "
                f"{', '.join(lacking)}: its kernels would stop the process with an illegal "
                "instruction (compile it on, or for, this kind of machine)")


def _files_in(directory: Path, name: str, package: Path | None) -> ModelFiles:
    libs = sorted(p for p in directory.rglob("*.so") if not p.parent.name.startswith("build-"))
    cpp_only = is_cpp_only(directory) if not libs else None
    if cpp_only is not None:
        libs = [build_library(cpp_only)]
    if not libs:
        raise ModelLoadError(f"model {name!r} in {str(package or directory)!r} has no library "
                             "(nor the sources and build options of a C++-only package)")
    lib = next((p for p in libs if p.name.endswith(".wrapper.so")), libs[0])
    stem = lib.name.removesuffix(".so")
    from_dir = cpp_only.parent if cpp_only is not None else lib.parent
    meta: dict[str, str] = {}
    for mpath in sorted(directory.rglob("*metadata.json")):
        try:
            meta.update({k: str(v) for k, v in json.loads(mpath.read_text()).items()})
        except (ValueError, AttributeError) as exc:
            raise ModelLoadError(f"bad metadata {str(mpath)!r}: {exc}") from exc
    source = from_dir / (stem + ".cpp")
    extern = from_dir / (stem + ".json")
    config = directory / "weights_config.json"
    blobs = sorted(directory.rglob("*_weights.blob")) or sorted(directory.rglob("*.blob"))
    cubins = sorted(directory.rglob("*.cubin")) + sorted(directory.rglob("*.fatbin"))
    files = ModelFiles(
        name=name,
        library=lib,
        source=source if source.is_file() else None,
        blob=blobs[0] if blobs else None,
        cubin_dir=cubins[0].parent if cubins else None,
        metadata=meta,
        package=package,
        extern_json=extern if extern.is_file() else None,
        weights_config=config if config.is_file() else None,
    )
    _check_platform(meta, f"model {name!r} in {str(package or lib)!r}")
    _check_cpu_isa(meta, f"model {name!r} in {str(package or lib)!r}")
    return files


def package_path(source: object, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A package given as a path, or as its bytes (`bytes`, `bytearray`, a binary file object
    such as `io.BytesIO` or an open file): bytes are written once into the cache, under their
    own hash, and read from there like a path."""
    if isinstance(source, (str, os.PathLike)):
        if not os.fspath(source):  # Path("") is "." (the current directory)
            raise ModelLoadError("expected a package's path, got an empty one")
        return Path(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif callable(getattr(source, "read", None)):
        data = source.read()  # type: ignore[attr-defined]
        if not isinstance(data, bytes):
            raise ModelLoadError(f"the file object gave {type(data).__name__}, not bytes: open "
                                 "the package in binary mode ('rb')")
    else:
        raise ModelLoadError(f"expected a package: a path, bytes or a binary file object, got "
                             f"{type(source).__name__}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "bytes" / (hashlib.sha256(data).hexdigest() + ".pt2")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)  # atomic: concurrent writers each install a whole file
    return path


def open_model(
    path: str | os.PathLike[str] | bytes | Any,
    model_name: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ModelFiles:
    """Locate (extracting once, into the cache) the files of one model of a package or `.so`.

    `path` may also be the package's bytes or a binary file object (`package_path`).
    `model_name` picks a model of a multi-model package; by default the package's only model,
    or the one named "model" (what `aoti_compile_and_package` writes).
    """
    path = package_path(path, cache_dir)
    if path.suffix == ".so":
        if not path.is_file():
            raise ModelLoadError(f"{str(path)!r} does not exist or is not a file")
        return _bare(path)
    with _open_zip(path) as zf:
        models = _models_in(zf)
        model_name = _pick(path, models, model_name)
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        dest = root / _sha256(path) / model_name
        fresh = not dest.is_dir()
        _extract(zf, models[model_name], dest)
        if (dest / "weights_config.json").is_file():
            _extract(zf, _weights_in(zf), dest / "weights")
    try:
        files = _files_in(dest, model_name, path)
    except BaseException:
        if fresh:
            _remove(dest)
        raise
    files.extracted = dest if fresh else None
    return files


def check_package(path: str | os.PathLike[str], model_name: str | None = None) -> None:
    """Raise `ModelLoadError` where `open_model(path, model_name)` would before extracting: a
    missing file, not a package, no such model. Reads the zip's directory only (a server checks
    its packages with it when it is made, before it starts)."""
    path = package_path(path)
    if path.suffix == ".so":
        if not path.is_file():
            raise ModelLoadError(f"{str(path)!r} does not exist or is not a file")
        return
    with _open_zip(path) as zf:
        _pick(path, _models_in(zf), model_name)


def _pick(path: Path, models: Mapping[str, object], model_name: str | None) -> str:
    """The model of a package to open: `model_name`, else its only one, else "model"."""
    if not models:
        raise ModelLoadError(f"{str(path)!r} holds no AOTInductor model (no {_MARK[1:]}...)")
    if model_name is None:
        if len(models) == 1:
            return next(iter(models))
        if "model" in models:
            return "model"
        raise ModelLoadError(
            f"{str(path)!r} holds several models ({', '.join(sorted(models))}): pass model_name")
    if model_name not in models:
        raise ModelLoadError(
            f"{str(path)!r} has no model {model_name!r} (it has: {', '.join(sorted(models))})")
    return model_name


def discard(files: ModelFiles) -> None:
    """After a load of `files` failed: remove what that load extracted (a later load extracts
    it again), so that the cache holds only packages that loaded."""
    if files.extracted is not None:
        _remove(files.extracted)
        files.extracted = None


def _remove(dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    try:
        dest.parent.rmdir()  # the package's directory, once it holds no model
    except OSError:
        pass


def _bare(lib: Path) -> ModelFiles:
    """A bare model library: its source and blob are used when they lie beside it."""
    stem = lib.name.removesuffix(".so")
    source = lib.with_name(stem + ".cpp")
    blob = lib.with_name(stem + "_weights.blob")
    meta_path = lib.with_name(stem + "_metadata.json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    extern = lib.with_name(stem + ".json")
    files = ModelFiles(
        extern_json=extern if extern.is_file() else None,
        name=stem,
        library=lib,
        source=source if source.is_file() else None,
        blob=blob if blob.is_file() else None,
        metadata={k: str(v) for k, v in meta.items()},
    )
    _check_platform(files.metadata, str(lib))
    _check_cpu_isa(files.metadata, str(lib))
    return files
