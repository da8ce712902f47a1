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
    turns = row["c1_vs_direct_turns"]
    assert len(turns) == 3 and all(r > 0 for r in turns)  # the warm-up turn left out
    assert row["c1_vs_direct"] == sorted(turns)[1]  # their median, not a ratio of medians
