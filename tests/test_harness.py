"""The load harness: its c1 figure (aioti at concurrency 1 against the direct call), and the
loads it refuses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import aioti
from aioti import harness
from aioti.harness import measure

pytestmark = pytest.mark.anyio


async def test_c1_in_turns(models: dict[str, Path]) -> None:
    """Direct calls on the loop's thread take turns with aioti's (as on a GPU): every turn
    measured, the figure a ratio of the two."""
    async with aioti.load(models["small_mlp"]) as model:
        inputs = model.signature.example(rows=2)
        row = await harness._c1_in_turns(model, inputs, 0.3, turns=3)
    assert row["direct_measured_in"] == "loop thread, 3 turns"
    assert row["c1_p50_ms"] > 0 and row["direct_p50_ms"] > 0
    turns = row["c1_vs_direct_turns"]
    assert len(turns) == 3 and all(r > 0 for r in turns)  # the warm-up turn left out
    assert row["c1_vs_direct"] == sorted(turns)[1]  # their median, not a ratio of medians


async def test_measure_refuses_a_load_that_measures_nothing(models: dict[str, Path]) -> None:
    async with aioti.load(models["small_mlp"]) as model:
        x = [torch.randn(2, 64)]
        with pytest.raises(ValueError, match="concurrency must be >= 1, got 0"):
            await measure(model, x, 0, 0.1)
        with pytest.raises(ValueError, match="duration must be a finite number > 0, got inf"):
            await measure(model, x, 1, math.inf)
        assert (await measure(model, x, 2, 0.05))["requests"] > 0
