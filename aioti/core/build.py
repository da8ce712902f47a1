"""Building the model library of a C++-only package (`aot_inductor.package_cpp_only=True`).

Such a package holds the wrapper's source (`<stem>.cpp`), its constants as an object file
(`*.weights.o`) and the compiler and linker options torch recorded (`<stem>_compile_flags.json`,
`<stem>_linker_flags.json`), but no library. aioti compiles it once, with the options recorded
and the include and library directories of the torch installed here, into the package's cache
directory under a key of the toolchain (compiler and torch versions): later loads, in any
process, open the built library. A build writes a private directory and renames it into place,
so concurrent loads never see half a library.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError

__all__ = ["build_library", "is_cpp_only"]

log = logging.getLogger("aioti")


def is_cpp_only(directory: Path) -> Path | None:
    """The wrapper source of a C++-only model directory, or None if it is not one."""
    for flags in sorted(directory.glob("*_compile_flags.json")):
        cpp = flags.with_name(flags.name.removesuffix("_compile_flags.json") + ".cpp")
        if cpp.is_file():
            return cpp
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the build options {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{str(path)!r}: expected a JSON object of build options")
    return data


def _local_dirs() -> tuple[list[str], list[str]]:
    """Include and library directories of this Python and torch."""
    root = Path(torch.__file__).parent
    includes = [sysconfig.get_paths()["include"], str(root / "include"),
                str(root / "include" / "torch" / "csrc" / "api" / "include")]
    libs = [str(root / "lib")] + [d for d in [sysconfig.get_config_var("LIBDIR")] if d]
    return includes, libs


def _command(options: dict[str, Any], sources: list[str], output: str, compile_only: bool
             ) -> list[str]:
    """A compiler command from torch's recorded options: its own directories that exist here
    are kept, torch's and Python's are this installation's."""
    includes, libs = _local_dirs()
    own = lambda key: [d for d in options.get(key, []) if d and Path(d).is_dir()
                       and "torch" not in Path(d).parts and "python" not in d.lower()]
    cmd = [options.get("compiler") or "c++", *sources]
    cmd += [f"-D{d.strip()}" for d in options.get("definitions", []) if d.strip()]
    cmd += [f"-{f}" for f in options.get("cflags", []) if f]
    cmd += [f"-I{d}" for d in includes + own("include_dirs")]
    cmd += [a for arg in options.get("passthrough_args", []) for a in shlex.split(arg)]
    cmd += ["-c"] if compile_only else []
    cmd += ["-o", output]
    if not compile_only:
        cmd += [f"-l{lib}" for lib in options.get("libraries", [])]
        cmd += [f"-L{d}" for d in libs + own("libraries_dirs")]
        cmd += [f"-{f}" for f in options.get("ldflags", []) if f]
    return cmd


def _run(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except FileNotFoundError as exc:
        raise ModelLoadError(
            f"{what} needs the C++ compiler {cmd[0]!r}, which is not on PATH (install it, or "
            "load a package compiled with its library: package_cpp_only=False)") from exc
    except subprocess.TimeoutExpired as exc:
        raise ModelLoadError(f"{what}: the compiler ran past {exc.timeout} s") from exc
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise ModelLoadError(f"{what} failed ({cmd[0]} exit {proc.returncode}): {tail}")


def build_library(cpp: Path) -> Path:
    """The model library built from C++-only sources (`cpp`, the wrapper source): from the
    cache when built before with the same toolchain, else compiled now (minutes for a big
    model; logged on the "aioti" logger)."""
    stem = cpp.name.removesuffix(".cpp")
    compile_opts = _read(cpp.with_name(stem + "_compile_flags.json"))
    link_opts = _read(cpp.with_name(stem + "_linker_flags.json"))
    objects = sorted(str(p) for p in cpp.parent.glob("*.o"))
    compiler = compile_opts.get("compiler") or "c++"
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        why = "which is not on PATH" if isinstance(exc, FileNotFoundError) else str(exc)
        raise ModelLoadError(
            "this package is C++-only (compiled with package_cpp_only=True: sources, no "
            f"library); building its library needs the C++ compiler {compiler!r}, {why}") from exc
    key = hashlib.sha256(json.dumps([version, torch.__version__, compile_opts, link_opts])
                         .encode()).hexdigest()[:16]
    out = cpp.parent / f"build-{key}" / f"{stem}.so"
    if out.is_file():
        return out
    what = f"building the library of C++-only package model {cpp.parent.name!r}"
    log.info("%s (once; cached in %s) ...", what, out.parent)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cpp.parent))
    try:
        obj = str(tmp / f"{stem}.o")
        _run(_command(compile_opts, [str(cpp)], obj, True), what)
        _run(_command(link_opts, [obj, *objects], str(tmp / out.name), False), what)
        weights = cpp.with_name(stem + "_serialized_weights.bin")
        if weights.is_file():  # weights appended to the library, page-aligned, as torch does
            with (tmp / out.name).open("ab") as lib:
                lib.write(b" " * (16384 - lib.tell() % 16384))
                lib.write(weights.read_bytes())
        os.unlink(obj)
        try:
            os.rename(tmp, out.parent)
        except OSError:
            if not out.is_file():  # lost a race only if the winner's build is there
                raise
    finally:
        if tmp.is_dir():
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()
    log.info("built %s in %.0f s", out, time.monotonic() - started)
    return out
