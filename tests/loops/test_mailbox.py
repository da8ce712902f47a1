"""The mailbox that merges workers' posts to a loop: with a plain list as the loop (no loop
needed), and on asyncio and trio with sending threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

from aioti.loops import current_loop
from aioti.loops.mailbox import Mailbox


class ListLoop:
    """A loop stand-in: posted calls wait in a list until `run` runs them."""

    def __init__(self, open_: bool = True) -> None:
        self.posted: list[tuple[Callable[[Any], object], Any]] = []
        self.open = open_

    def post(self, fn: Callable[[Any], object], arg: Any) -> bool:
        if self.open:
            self.posted.append((fn, arg))
        return self.open

    def run(self) -> None:
        posted, self.posted = self.posted, []
        for fn, arg in posted:
            fn(arg)


def test_sends_while_a_drain_is_pending_ride_on_it_in_order():
    loop, got = ListLoop(), []
    box = Mailbox(loop.post)
    for i in range(5):
        box.send(got.append, i)
    assert len(loop.posted) == 1 and got == []
    loop.run()
    assert got == [0, 1, 2, 3, 4] and loop.posted == []
    box.send(got.append, 5)  # nothing pending now: a drain of its own
    assert len(loop.posted) == 1
    loop.run()
    assert got == [0, 1, 2, 3, 4, 5]


def test_a_send_during_a_drain_runs_in_it():
    loop, got = ListLoop(), []
    box = Mailbox(loop.post)
    box.send(lambda _: box.send(got.append, "later"), None)
    box.send(got.append, "first")
    loop.run()
    assert got == ["first", "later"]


def test_a_failing_call_does_not_strand_the_rest():
    loop, got = ListLoop(), []
    box = Mailbox(loop.post)

    def boom(_: object) -> None:
        raise KeyError("boom")

    box.send(got.append, 1)
    box.send(boom, None)
    box.send(got.append, 2)
    with pytest.raises(KeyError):
        loop.run()
    assert got == [1] and len(loop.posted) == 1  # the rest posted again
    loop.run()
    assert got == [1, 2]


def test_a_closed_loop_drops_sends_and_a_later_send_posts_again():
    loop, got = ListLoop(open_=False), []
    box = Mailbox(loop.post)
    box.send(got.append, 1)
    loop.open = True
    box.send(got.append, 2)
    loop.run()
    assert got == [2]


@pytest.mark.anyio
async def test_threads_sending_to_a_busy_loop_share_its_wake_ups():
    loop = current_loop()
    posts = 0

    def post(fn: Callable[[Any], object], arg: Any) -> bool:
        nonlocal posts
        posts += 1
        return loop.post(fn, arg)

    box = Mailbox(post)
    got: dict[int, list[int]] = {k: [] for k in range(4)}
    per_thread = 500

    def sender(k: int) -> None:
        for i in range(per_thread):
            box.send(got[k].append, i)

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)  # the loop is busy: nothing drains meanwhile
    for t in threads:
        t.join()
    with anyio.fail_after(10):
        while sum(map(len, got.values())) < 4 * per_thread:
            await anyio.sleep(0.001)
    assert all(v == list(range(per_thread)) for v in got.values())
    assert posts <= 4  # the loop was blocked throughout: one drain, or one per racing thread
