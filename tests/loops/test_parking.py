"""The cross-loop parking lot and the lock built on it, on asyncio and trio, with wakers in
other threads."""

from __future__ import annotations

import threading

import anyio
import pytest

from aioti.loops.lock import CrossLoopLock
from aioti.loops.parking import ParkingLot

pytestmark = pytest.mark.anyio


async def test_unpark_wakes_fifo_from_another_thread():
    lot = ParkingLot()
    woken: list[tuple[int, object]] = []

    async def park(i: int) -> None:
        try:
            woken.append((i, await lot.wait(lot.park())))
        except KeyError as exc:
            woken.append((i, exc))

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(park, i)
            await anyio.sleep(0.001)
        assert len(lot) == 3
        t = threading.Thread(target=lambda: lot.unpark(2, result="go"))
        t.start()
        t.join()
        with anyio.fail_after(5):
            while len(woken) < 2:
                await anyio.sleep(0.001)
        # the two parked first are woken (trio runs woken tasks in an order of its own)
        assert sorted(woken) == [(0, "go"), (1, "go")] and len(lot) == 1
        assert lot.unpark_all(error=KeyError("boom")) == 1
    assert woken[2][0] == 2 and isinstance(woken[2][1], KeyError)


async def test_a_cancelled_waiter_leaves_and_a_lost_turn_is_passed_on():
    lot = ParkingLot()
    passed: list[int] = []
    with anyio.move_on_after(0.01):
        await lot.wait(lot.park(), on_lost_turn=lambda: passed.append(1))
    assert len(lot) == 0 and passed == []  # left while parked: no turn to pass
    with anyio.CancelScope() as scope:
        ticket = lot.park()
        scope.cancel()  # cancelled ...
        lot.unpark()  # ... and handed a turn before it resumes
        await lot.wait(ticket, on_lost_turn=lambda: passed.append(2))
    assert passed == [2]


async def test_lock_is_fifo_and_survives_cancellation():
    lock = CrossLoopLock()
    order: list[int] = []

    async def hold(i: int) -> None:
        async with lock:
            order.append(i)
            await anyio.sleep(0.005)

    await lock.acquire()
    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(hold, i)
            await anyio.sleep(0.001)
        with anyio.move_on_after(0.001):
            await lock.acquire()  # a waiter that leaves
        lock.release()
    assert order == [0, 1, 2]
    with anyio.fail_after(1):
        await lock.acquire()  # not leaked
    lock.release()
    with pytest.raises(RuntimeError, match="unlocked"):
        lock.release()
