"""Building aioti's native helpers: small C or C++ sources shipped with the package, compiled on
first use with the system's compiler into aioti's cache and shared by every later process.

A helper is keyed by its source, the compiler's version and the machine, so that a changed
source or compiler builds a new one; concurrent builders (threads or processes) each install a
whole file by an atomic rename.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from .package import default_cache_dir

__all__ = ["build", "compiler"]

#: language -> (its name, the environment variable naming the compiler, default compilers)
_COMPILERS = {"c": ("C", "CC", ("cc", "gcc")), "c++": ("C++", "CXX", ("c++", "g++"))}


def compiler(language: str) -> str:
    """The compiler for `language` ("c" or "c++"): `$CC`/`$CXX`, else the first default on
    PATH. Raises `OSError` naming what was looked for when there is none."""
    name, var, defaults = _COMPILERS[language]
    wanted = [os.environ[var]] if os.environ.get(var) else list(defaults)
    for cc in wanted:
        if shutil.which(cc):
            return cc
    raise OSError(f"no {name} compiler: none of {', '.join(wanted)} is on PATH"
                  + ("" if os.environ.get(var) else f" (set ${var} to name one)"))


def build(source: Path, language: str, flags: tuple[str, ...] = ()) -> Path:
    """The shared library built from `source`, from the cache when it was built before.
    Raises `OSError` (no compiler, a failed compile: its last lines) or `SubprocessError`."""
    cc = compiler(language)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    text = source.read_bytes()
    key = hashlib.sha256(text + version.encode() + platform.machine().encode()
                         + " ".join(flags).encode()).hexdigest()
    out = default_cache_dir() / "native" / f"{source.stem}-{key[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", *flags, "-o", str(built),
                               str(source)], capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise OSError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
        os.replace(built, out)  # atomic: concurrent builders each install a whole file
    return out
