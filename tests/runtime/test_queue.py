"""The request queue on its own: bounds, room, cancellation, taking, the gate, closing. No
model and no event loop: requests carry a plain loop (`fakes.PlainLoop`)."""

from __future__ import annotations

import threading

import pytest
from fakes import PlainLoop

from aioti.errors import ClosedError
from aioti.runtime.lifecycle import FORKED
from aioti.runtime.options import RuntimeOptions
from aioti.runtime.queue import STOP, RequestQueue
from aioti.runtime.request import CANCELLED, QUEUED, RUNNING, Request


def make(n: int, loop: PlainLoop | None = None, rows: int = 1) -> list[Request]:
    loop = loop or PlainLoop()
    reqs = [Request([i], None, loop) for i in range(n)]
    for r in reqs:
        r.rows = rows
    return reqs


def test_bounds_and_closing():
    q = RequestQueue(RuntimeOptions(max_queue=2))
    a, b, c = make(3)
    assert q.try_put(a) and q.try_put(b)
    assert not q.try_put(c)  # full
    assert q.counts()["queued"] == 2
    dropped = q.close(cancel_queued=True)
    assert dropped == [a, b] and all(r.state == CANCELLED for r in dropped)
    with pytest.raises(ClosedError, match="closed"):
        q.try_put(c)


@pytest.mark.parametrize(("workers", "expected", "busy_"), [(1, 8, 1), (2, 5, 2)])
def test_a_take_is_one_workers_share_up_to_a_full_batch(workers, expected, busy_):
    """A worker takes its share; `busy` counts one more where another worker is to take the
    rest (a lone worker takes it after this batch: none runs beside it)."""
    q = RequestQueue(RuntimeOptions(workers=workers, max_batch_size=8))
    reqs = make(10)
    for r in reqs:
        q.try_put(r)
    batch, busy = q.take(0, in_flight=False)
    assert batch == reqs[:expected] and busy == busy_
    assert q.counts()["running"] == 1


def test_rows_fill_a_batch():
    q = RequestQueue(RuntimeOptions(max_batch_size=8))
    for r in make(5, rows=3):
        q.try_put(r)
    batch, _ = q.take(0, in_flight=False)
    assert [r.rows for r in batch] == [3, 3, 3]  # stops once 8 rows are reached or passed


def _taken_in_a_thread(q: RequestQueue) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(q.take(0, in_flight=False)), daemon=True)
    t.start()
    return t, out


def test_a_full_queue_is_taken_without_lingering():
    """Under demand a worker waits up to the delay for a fuller batch; a queue bounded below a
    batch (here 2 requests of 1 row, batches of 8) cannot fill one: the worker takes it at
    once, and one already lingering is woken when the queue fills (before, it waited out the
    delay - 60 s here - for every batch)."""
    q = RequestQueue(RuntimeOptions(max_queue=2, max_batch_size=8, max_delay_ms=60_000))
    a, b, c, d = make(4)
    q.try_put(a), q.try_put(b)
    assert q.take(0, in_flight=False)[0] == [a, b]  # a merged take: demand from now on
    q.try_put(c)
    t, out = _taken_in_a_thread(q)  # lingers: one request, room for another
    t.join(0.2)
    assert t.is_alive()
    q.try_put(d)  # the queue is full: no fuller batch can come
    t.join(10)
    assert not t.is_alive() and out[0][0] == [c, d]  # type: ignore[index]
    e, f = make(2)
    q.try_put(e), q.try_put(f)
    t, out = _taken_in_a_thread(q)  # full already: taken without lingering
    t.join(10)
    assert not t.is_alive() and out[0][0] == [e, f]  # type: ignore[index]


def test_cancel_queued_and_taken_not_begun():
    q = RequestQueue(RuntimeOptions())
    a, b, c = make(3)
    for r in (a, b, c):
        q.try_put(r)
    q.cancel(a)  # queued: removed, never taken
    assert a.state == CANCELLED and q.counts()["queued"] == 2
    batch, _ = q.take(0, in_flight=False)
    assert batch == [b, c]
    b.waiter.cancelled = True  # its caller left after the take, before the batch began
    assert q.begin(batch) == [c]
    assert b.state == CANCELLED and c.state == RUNNING
    assert q.counts()["cancelled"] == 2
    q.cancel(c)  # running: left to finish, outputs dropped on delivery
    assert c.state == CANCELLED and q.counts()["cancelled"] == 3


def test_closing_with_cancel_queued_refuses_taken_not_begun():
    q = RequestQueue(RuntimeOptions())
    (a,) = make(1)
    q.try_put(a)
    batch, _ = q.take(0, in_flight=False)
    q.close(cancel_queued=True)
    assert q.begin(batch) == [] and isinstance(a.error, ClosedError) and a.state == QUEUED


def test_take_sleeps_until_work_and_stops_when_closed():
    q = RequestQueue(RuntimeOptions())
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(q.take(0, in_flight=False)))
    t.start()
    t.join(0.05)
    assert t.is_alive()  # asleep: nothing queued
    (a,) = make(1)
    q.try_put(a)
    t.join(5)
    assert got == [([a], 1)]
    q.close()
    assert q.take(0, in_flight=False) is STOP
    assert q.take(0, in_flight=True) is None  # land what is in flight first


def test_exclusive_waits_for_running_batches_and_holds_new_ones():
    q = RequestQueue(RuntimeOptions())
    a, b = make(2)
    q.try_put(a)
    q.take(0, in_flight=False)  # a batch runs
    entered = threading.Event()

    def mutate() -> None:
        with q.exclusive():
            entered.set()
            q.try_put(b)
            assert q.take_here(PlainLoop()) is None  # nothing starts while the gate is held
            assert q.take(0, in_flight=True) is None

    t = threading.Thread(target=mutate)
    t.start()
    assert not entered.wait(0.05)  # waits for the running batch
    q.finish(1, 1, 0)
    assert entered.wait(5)
    t.join(5)
    assert q.take(0, in_flight=False) == ([b], 1)  # after the gate, work flows again


def test_the_last_worker_out_gets_the_leftovers():
    q = RequestQueue(RuntimeOptions(workers=2))
    a, b = make(2)
    q.try_put(a)
    q.try_put(b)
    assert q.exit_worker() is None  # another worker remains
    assert q.exit_worker() == [a, b] and q.closing


def test_orphaned_after_a_fork_refuses_with_the_reason():
    q = RequestQueue(RuntimeOptions())
    (a,) = make(1)
    q.orphaned()
    with pytest.raises(ClosedError) as caught:
        q.try_put(a)
    assert str(caught.value) == FORKED
