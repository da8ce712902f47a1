"""How to test code that uses an AOTI model, with anyio's pytest plugin, on asyncio and trio.

Run it with `pytest examples/pytest_harness`. The `anyio_backend` fixture (in conftest.py)
parametrizes every async test over both backends; the model is compiled once per session and
loaded per test (loading is cheap: the package is extracted once, into the cache).
"""

from __future__ import annotations

import anyio
import pytest
import torch

import aioti
from aioti.testing import eager_model

pytestmark = pytest.mark.anyio


async def classify(model: aioti.AsyncModel, batch: torch.Tensor) -> list[int]:
    """The code under test: an async function that uses the model."""
    return (await model(batch)).argmax(dim=1).tolist()


async def test_classify_matches_eager(model_path):
    x = torch.randn(5, 64)
    async with aioti.load(model_path) as model:
        with anyio.fail_after(10):  # every wait in a test has a bound
            assert await classify(model, x) == eager_model("small_mlp")(x).argmax(dim=1).tolist()


async def test_bad_input_is_reported(model_path):
    async with aioti.load(model_path) as model:
        with pytest.raises(aioti.InputError, match="expected size 64"):
            await classify(model, torch.randn(5, 3))
