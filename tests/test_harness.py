"""The load harness's c1 figure: aioti at concurrency 1 against the direct call."""

from __future__ import annotations

from pathlib import Path

import pytest

import aioti
from aioti import harness

pytestmark = pytest.mark.anyio


async def test_c1_in_turns(models: dict[str, Path]) -> None:
    """Direct calls on the loop's thread take turns with aioti's (as on a GPU): every turn
    measured, the figure a ratio of the two."""
    async with aioti.load(models["small_mlp"]) as model:
        inputs = model.signature.example(rows=2)
        row = await harness._c1_in_turns(model, inputs, 0.3, turns=3)
    assert row["direct_measured_in"] == "loop thread, 3 turns"
    assert row["c1_p50_ms"] > 0 and row["direct_p50_ms"] > 0
    # The median of the turns' ratios lies between the smallest and largest turn's: with these
    # p50s about equal, near their ratio; far from it only if the turns were mixed up.
    assert 0.2 < row["c1_vs_direct"] / (row["c1_p50_ms"] / row["direct_p50_ms"]) < 5
