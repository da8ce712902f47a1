"""Shared fixtures: compiled reference models (cached across runs), both async backends,
backends of the tests' own (for a second device kind, and in place of the CPU one), and a hard
bound on every test so that a hang fails loudly instead of stalling CI."""

from __future__ import annotations

import faulthandler
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import aioti
from aioti.backends.cpu import CpuBackend
from aioti.testing import compile_model

HANG_LIMIT_S = 300


@pytest.fixture(autouse=True)
def _bounded() -> object:
    faulthandler.dump_traceback_later(HANG_LIMIT_S, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def models() -> dict[str, Path]:
    """name -> cached .pt2 path, compiled on first use."""

    class Lazy(dict):
        def __missing__(self, name: str) -> Path:
            self[name] = path = compile_model(name, verbose=True)
            return path

    return Lazy()


def _registering(kind: str) -> Iterator[Callable[[type], None]]:
    """Register backend classes for device type `kind` in a test; aioti's CPU backend is put
    back for it afterwards, whatever the test did."""
    def register(cls: type) -> None:
        aioti.register_backend(kind, cls, replace=True)
    try:
        yield register
    finally:
        aioti.register_backend(kind, CpuBackend, replace=True)


@pytest.fixture
def other_backend() -> Iterator[Callable[[type], None]]:
    """Register a backend class for device type privateuseone (a CPU underneath)."""
    yield from _registering("privateuseone")


@pytest.fixture
def cpu_backend() -> Iterator[Callable[[type], None]]:
    """Register a backend class (a `CpuBackend` that records or defers) for device type cpu,
    for this test only."""
    yield from _registering("cpu")
