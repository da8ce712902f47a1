"""The one-shot waiters a task awaits and a worker's delivery settles, on asyncio and trio, with
plain items as the finished work (no model, no worker)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import anyio
import pytest

from aioti.loops import current_loop

pytestmark = pytest.mark.anyio


@dataclass
class Item:
    """An `Outcome`: whom to wake, and with what."""

    waiter: Any
    result: Any = None
    error: BaseException | None = None


async def test_a_wait_whose_outcome_was_sent_before_its_deadline_passed_gets_it():
    """An outcome sent to the loop (its delivery posted) while the loop was busy, the waiting
    task's deadline passing meanwhile: the task gets the outcome on both loops (asyncio runs
    the delivery before the timer; trio processes deadlines first, and its wait refuses the
    abort: its outcome is on its way). The deadline lands at the task's next checkpoint."""
    loop = current_loop()
    assert loop is not None
    item = Item(loop.waiter(), result=42)
    got: list[Any] = []

    async def wait() -> None:
        with anyio.move_on_after(0.05) as scope:
            got.append(await item.waiter)
            got.append("resumed")
            await anyio.lowlevel.checkpoint()
            got.append("not cancelled")
        got.append(scope.cancelled_caught)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.sleep(0.01)  # the waiter is awaited
        loop.send(loop.settle_all, [item])  # as a worker's delivery does
        time.sleep(0.1)  # the loop busy past the deadline, the delivery pending
    assert got == [42, "resumed", True]


async def test_a_wait_cancelled_before_its_outcome_was_sent_drops_it():
    """A task whose deadline passed before anything was sent is cancelled, and the outcome
    sent later is dropped (settling skips a waiter whose task stopped waiting, rather than
    raising in the loop's callback: asyncio would only log that)."""
    loop = current_loop()
    assert loop is not None
    item = Item(loop.waiter(), result=42)
    with anyio.move_on_after(0.01) as scope:
        await item.waiter
    assert scope.cancelled_caught and item.waiter.done()
    settled: list[bool] = []

    def settle(items: list[Item]) -> None:
        loop.settle_all(items)
        settled.append(True)  # not reached if settling raised

    loop.send(settle, [item])
    with anyio.fail_after(10):
        while not settled:
            await anyio.sleep(0.001)  # the delivery runs, and skips it
