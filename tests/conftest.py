"""Shared fixtures: compiled reference models (cached across runs), both async backends, a
backend of the tests' own for a second device kind, and a hard bound on every test so that a
hang fails loudly instead of stalling CI."""

from __future__ import annotations

import faulthandler
import sys
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


@pytest.fixture
def other_backend() -> object:
    """Register a backend class for device type privateuseone (a CPU underneath)."""
    def register(cls: type) -> None:
        aioti.register_backend("privateuseone", cls, replace=True)
    yield register
    aioti.register_backend("privateuseone", CpuBackend, replace=True)
