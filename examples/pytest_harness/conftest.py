from __future__ import annotations

from pathlib import Path

import pytest

from aioti.testing import compile_model


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def model_path() -> Path:
    return compile_model("small_mlp")
