"""The worker protocol with a fake executor and no compiled model: runs and outcomes, batches in
flight landing in launch order, delivery to several loops, the gate, closing with work in
flight; and the dispatcher's backpressure on real asyncio and trio loops."""

from __future__ import annotations

import threading
import time

import anyio
import pytest
import torch
from fakes import DoublingExecutor, PlainLoop, TokenBackend

from aioti.backends.base import Backend
from aioti.errors import ClosedError, QueueFullError
from aioti.loops import current_loop
from aioti.runtime.dispatch import Dispatcher
from aioti.runtime.options import RuntimeOptions
from aioti.runtime.request import NotStarted, Request

CPU = Backend(torch.device("cpu"))


def request(x: object, loop: PlainLoop) -> Request:
    return Request([x], None, loop)


def run_beside(d: Dispatcher, ex: DoublingExecutor, first: Request, second: Request) -> None:
    """Submit `first`, held in the executor (its gate shut), then `second`, and wait (at most
    5 s) until another worker runs it beside the first."""
    assert d.try_submit(first)
    assert ex.started.wait(5)
    assert d.try_submit(second)
    for _ in range(5000):
        if d.queue.running == 2:
            break
        time.sleep(0.001)
    assert d.queue.running == 2


def test_runs_deliver_outcomes_one_post_per_loop_per_batch():
    ex = DoublingExecutor()
    ex.gate = threading.Event()
    stopped = threading.Event()
    d = Dispatcher(ex, CPU, RuntimeOptions(), on_stopped=stopped.set)
    one, two = PlainLoop(), PlainLoop()
    first = request(torch.tensor(0.0), one)
    assert d.try_submit(first)
    assert ex.started.wait(5)  # the worker holds `first` in the executor
    reqs = [request(torch.tensor(float(i)), (one, two)[i % 2]) for i in range(1, 9)]
    reqs.append(request(torch.tensor(-1.0), one))  # fails alone
    for r in reqs:
        assert d.try_submit(r)
    ex.gate.set()  # the rest queued meanwhile: one batch
    assert one.drain(1)[0] == [first]
    (batch_one,) = one.drain(1)
    (batch_two,) = two.drain(1)
    assert batch_one == [r for r in reqs if r.loop is one]
    assert batch_two == [r for r in reqs if r.loop is two]
    for r in reqs[:-1]:
        assert torch.equal(r.waiter.outcome[0][0], r.result[0]) and r.inputs is None
    assert isinstance(reqs[-1].waiter.outcome[1], ValueError)
    stats = d.stats()
    assert (stats["completed"], stats["failed"], stats["running"]) == (9, 1, 0)
    d.shutdown(wait=5)
    assert stopped.is_set() and d.stopped


def test_batches_in_flight_land_in_launch_order():
    """With a backend whose batches finish later, the worker launches the next batches (up to
    max_in_flight) and delivers each only once it is ready, in launch order."""
    backend = TokenBackend()
    ex = DoublingExecutor(chunk=1)
    d = Dispatcher(ex, backend, RuntimeOptions(max_batch_size=1))
    loop = PlainLoop()
    reqs = [request(torch.tensor(float(i)), loop) for i in range(3)]
    for r in reqs:
        d.try_submit(r)
    for _ in range(100):
        if backend.issued == 3:
            break
        threading.Event().wait(0.01)
    assert backend.issued == 3 and loop.posted.empty()  # launched, none delivered
    backend.release(2)  # the second is ready first: it still waits for the first
    threading.Event().wait(0.05)
    assert loop.posted.empty()
    backend.release(1)
    assert loop.drain(2) == [[reqs[0]], [reqs[1]]]
    backend.release(3)
    assert loop.drain(1) == [[reqs[2]]]
    d.shutdown(wait=5)


def test_close_with_work_in_flight_finishes_it_then_stops():
    ex = DoublingExecutor()
    ex.gate = threading.Event()
    order: list[str] = []
    d = Dispatcher(ex, CPU, RuntimeOptions(), on_stopped=lambda: order.append("stopped"))
    loop = PlainLoop()
    running = request(torch.tensor(1.0), loop)
    d.try_submit(running)
    assert ex.started.wait(5)
    queued = request(torch.tensor(2.0), loop)
    d.try_submit(queued)
    d.shutdown()  # queued work still runs (no cancel_queued)
    with pytest.raises(ClosedError):
        d.try_submit(request(torch.tensor(3.0), loop))
    assert not d.stopped
    ex.gate.set()
    d.join()
    order.append("joined")
    assert order == ["stopped", "joined"]
    posted = loop.drain(2)
    assert posted == [[running], [queued]] and queued.error is None


def test_close_with_cancel_queued_fails_the_queue():
    ex = DoublingExecutor()
    ex.gate = threading.Event()
    d = Dispatcher(ex, CPU, RuntimeOptions())
    loop = PlainLoop()
    d.try_submit(request(torch.tensor(1.0), loop))
    assert ex.started.wait(5)
    queued = request(torch.tensor(2.0), loop)
    d.try_submit(queued)
    d.shutdown(cancel_queued=True)
    (failed,) = loop.drain(1)
    assert failed == [queued] and isinstance(queued.waiter.outcome[1], ClosedError)
    ex.gate.set()
    d.join()
    assert len(ex.runs) == 1  # the queued request never ran


def test_orphaned_dispatcher_refuses_and_does_not_wait():
    d = Dispatcher(DoublingExecutor(), CPU, RuntimeOptions())
    d.orphaned()
    with pytest.raises(ClosedError, match="forked"):
        d.try_submit(request(torch.tensor(1.0), PlainLoop()))
    assert d.stopped
    d.queue = type(d.queue)(RuntimeOptions())  # let the real workers go
    d.shutdown()


@pytest.mark.anyio
@pytest.mark.parametrize("on_full", ["raise", "wait"])
async def test_backpressure_on_a_real_loop(on_full):
    """max_queue=2 with the worker held: a third request waits for room (and runs once there
    is some) or gets QueueFullError."""
    ex = DoublingExecutor()
    ex.gate = threading.Event()
    d = Dispatcher(ex, CPU, RuntimeOptions(max_queue=2))
    loop = current_loop()

    async def call(x: float) -> object:
        req = Request([torch.tensor(x)], None, loop)
        await d.submit(req, wait=on_full == "wait")
        return (await req.waiter)[0]

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 0.0)
            with anyio.fail_after(5):
                while not ex.started.is_set():
                    await anyio.sleep(0.001)
            tg.start_soon(call, 1.0)
            tg.start_soon(call, 2.0)
            await anyio.sleep(0.01)
            assert d.stats()["queued"] == 2
            if on_full == "raise":
                with pytest.raises(QueueFullError, match="full"):
                    await call(3.0)
                ex.gate.set()
            else:
                result: list[object] = []

                async def third() -> None:
                    result.append(await call(3.0))

                tg.start_soon(third)
                await anyio.sleep(0.01)
                assert not result  # parked for room
                ex.gate.set()
                with anyio.fail_after(5):
                    while not result:
                        await anyio.sleep(0.001)
                assert torch.equal(result[0], torch.tensor(6.0))
    finally:
        ex.gate.set()
        d.shutdown(wait=5)


@pytest.mark.anyio
@pytest.mark.parametrize("on_full", ["raise", "wait"])
async def test_on_loop_a_full_queue_left_by_a_stalled_loop_is_drained(on_full):
    """On-loop runs, max_queue 2: a loop whose thread stalls (its posts never run) fills the
    queue; a caller on this loop is still served - its full queue schedules a run here (it
    used to wait forever, or get QueueFullError every time)."""
    ex = DoublingExecutor()
    d = Dispatcher(ex, CPU, RuntimeOptions(max_queue=2, on_loop=True))
    stalled = PlainLoop()  # nobody drains it: its scheduled run never comes
    for i in range(2):
        assert d.try_submit(request(torch.tensor(float(i)), stalled))
    loop = current_loop()
    req = Request([torch.tensor(5.0)], None, loop)
    try:
        with anyio.fail_after(5):
            if on_full == "raise":
                with pytest.raises(QueueFullError):
                    await d.submit(req, wait=False)
                await anyio.sleep(0.01)  # the run it scheduled takes the queue
                req = Request([torch.tensor(5.0)], None, loop)
                await d.submit(req, wait=False)
            else:
                await d.submit(req)
            out = await req.waiter
        assert torch.equal(out[0], torch.tensor(10.0))
    finally:
        d.shutdown(wait=5)


def test_a_lone_request_runs_here_only_on_an_idle_model_with_short_runs():
    """`run_here_if_idle`: never before a run was measured, never while another batch runs or
    requests wait, never once runs are slower than the bound, nor again before the caller of
    the last one resumed (`ran_here_over`); its outcome is set in the request for its caller,
    not posted to its loop."""
    ex = DoublingExecutor()
    d = Dispatcher(ex, CPU, RuntimeOptions(idle_on_loop=True))
    loop = PlainLoop()
    try:
        first = request(torch.tensor(1.0), loop)
        assert not d.run_here_if_idle(first)  # not measured yet
        assert d.try_submit(first) and loop.drain(1) == [[first]]
        assert d.runner.per_row_s < 1.0  # measured by the worker's run
        d.runner.per_row_s = 0.0  # (this machine's timing aside)
        here = request(torch.tensor(2.0), loop)
        assert d.run_here_if_idle(here)
        assert ex.runs[-1] == [here] and here.waiter.outcome is None  # ran, not posted
        assert torch.equal(here.result[0], torch.tensor(4.0)) and here.error is None
        # before its caller resumed, a second request goes to the workers
        second = request(torch.tensor(9.0), loop)
        assert not d.run_here_if_idle(second)
        assert d.try_submit(second) and loop.drain(1) == [[second]]
        d.ran_here_over(loop)
        again = request(torch.tensor(6.0), loop)
        assert d.run_here_if_idle(again) and torch.equal(again.result[0], torch.tensor(12.0))
        d.ran_here_over(loop)
        assert d.queue.counts()["completed"] == 4
        d.runner.per_row_s = 1.0  # slower than the bound
        assert not d.run_here_if_idle(request(torch.tensor(3.0), loop))
        d.runner.per_row_s = 0.0
        ex.gate = threading.Event()
        busy = request(torch.tensor(4.0), loop)
        d.try_submit(busy)
        assert ex.started.wait(5)
        assert not d.run_here_if_idle(request(torch.tensor(5.0), loop))  # a batch runs
        ex.gate.set()
        loop.drain(1)
        # a batch of several requests completed: concurrent callers, so the workers take the
        # next one too, until a batch of one says the load is gone
        ex.gate, ex.started = threading.Event(), threading.Event()
        pair = [request(torch.tensor(7.0), loop), request(torch.tensor(8.0), loop)]
        held = request(torch.tensor(1.0), loop)
        assert d.try_submit(held) and ex.started.wait(5)
        assert all(d.try_submit(r) for r in pair)
        ex.gate.set()
        loop.drain(2)
        assert d.runner.last_batch == 2
        after = request(torch.tensor(2.0), loop)
        assert not d.run_here_if_idle(after)
        assert d.try_submit(after) and loop.drain(1) == [[after]]
        assert d.run_here_if_idle(request(torch.tensor(3.0), loop))
        d.ran_here_over(loop)
    finally:
        d.shutdown(wait=5)


def test_a_lone_request_whose_inputs_are_pending_goes_to_the_workers():
    """`Backend.caller_idle`: a lone request whose readiness token still has work pending (on
    a GPU, its caller's stream) is not run on its caller's thread, which would wait for that
    work too; the worker takes it (and its `begin_batch` waits for the token). One whose token
    is done runs here, and the lead's steps are not given the token again."""

    class Pending(Backend):
        def __init__(self) -> None:
            super().__init__(torch.device("cpu"))
            self.pending: set[object] = set()
            self.begun: list[list[object]] = []

        def caller_idle(self, ready: object) -> bool:
            return ready not in self.pending

        def begin_batch(self, ctx: object, readies: list[object]) -> None:
            self.begun.append(readies)

    backend = Pending()
    ex = DoublingExecutor()
    d = Dispatcher(ex, backend, RuntimeOptions(idle_on_loop=True))
    loop = PlainLoop()
    try:
        first = request(torch.tensor(1.0), loop)
        assert d.try_submit(first) and loop.drain(1) == [[first]]
        d.runner.per_row_s = 0.0  # measured short
        backend.pending.add("busy stream")
        busy = Request([torch.tensor(2.0)], "busy stream", loop)
        assert not d.run_here_if_idle(busy)
        assert d.try_submit(busy) and loop.drain(1) == [[busy]]
        assert backend.begun[-1] == ["busy stream"] and d.ran_here == 0
        idle = Request([torch.tensor(3.0)], "idle stream", loop)
        assert d.run_here_if_idle(idle) and torch.equal(idle.result[0], torch.tensor(6.0))
        assert backend.begun[-1] == [] and d.ran_here == 1
        d.ran_here_over(loop)
    finally:
        d.shutdown(wait=5)


def test_the_leads_batches_alone_are_measured_only_when_they_stayed_alone():
    """The lead's team size is tuned by the time of its batches alone; one that another
    worker's batch ran beside is not a measure of its size, and is not recorded."""
    from aioti.core.threads import ThreadTeams

    teams = ThreadTeams(alone=2, shared=1, others=1, tune=True)
    assert teams.tuner is not None
    recorded: list[int] = []
    record = teams.tuner.record
    teams.tuner.record = lambda i, s, n: (recorded.append(n), record(i, s, n))  # type: ignore[method-assign]
    ex = DoublingExecutor()
    d = Dispatcher(ex, CPU, RuntimeOptions(workers=2), teams=teams)
    loop = PlainLoop()

    def lone(x: float) -> None:
        assert d.try_submit(request(torch.tensor(x), loop))
        loop.drain(1)

    lone(1.0)  # the lead's first batch: untimed (its team size was just set)
    lone(2.0)
    assert recorded == [1]
    ex.gate, ex.started = threading.Event(), threading.Event()
    # alone when it begins, but the other worker's batch begins beside it
    run_beside(d, ex, request(torch.tensor(3.0), loop), request(torch.tensor(4.0), loop))
    ex.gate.set()
    loop.drain(2)
    assert recorded == [1]  # not a measure of its size
    ex.gate = None
    lone(5.0)
    assert recorded == [1, 1]
    d.shutdown(wait=5)


class _NoContextBackend(Backend):
    """A worker's start fails once `go` is set: a failure of the runtime, not of a run."""

    def __init__(self) -> None:
        super().__init__(torch.device("cpu"))
        self.go = threading.Event()

    def start_worker(self, index: int) -> object:
        self.go.wait(10)
        raise RuntimeError("no context for this worker")


@pytest.mark.parametrize("replica", [False, True], ids=["model", "replica of a pool"])
def test_a_failed_worker_says_why_to_queued_and_later_requests(caplog, replica):
    """A replica of a pool (one with `on_fault`) also reports the fault, and hands the requests
    left queued back unstarted (`NotStarted`: the pool runs them on another replica)."""
    backend, faults, stopped = _NoContextBackend(), [], threading.Event()
    d = Dispatcher(DoublingExecutor(), backend, RuntimeOptions(),
                   on_fault=faults.append if replica else None, on_stopped=stopped.set)
    loop = PlainLoop()
    queued = request(torch.tensor(1.0), loop)
    assert d.try_submit(queued)
    backend.go.set()
    assert stopped.wait(10)
    loop.drain(1)
    why = "worker 0 failed (RuntimeError: no context for this worker)"
    error = queued.error
    if replica:
        assert isinstance(error, NotStarted)
        error = error.error
    assert isinstance(error, ClosedError) and why in str(error)
    with pytest.raises(ClosedError, match=r"worker 0 failed \(RuntimeError"):
        d.try_submit(request(torch.tensor(2.0), loop))
    assert [str(f) for f in faults] == (["no context for this worker"] if replica else [])
    assert why in caplog.text  # with its traceback, on the "aioti" logger


def test_the_leading_size_of_any_inputs():
    """What a lone run's time is taken to grow with: the first input's leading size, at least
    1; for inputs that are not tensors (unchecked, `check_inputs=False`), 1, never an error."""
    loop = PlainLoop()

    class Odd:
        shape = 5  # not a sequence

    for inputs, size in (([torch.zeros(7, 3)], 7), ([torch.zeros(0, 3)], 1),
                         ([torch.tensor(2.0)], 1), ([], 1), ([3.0], 1), ([Odd()], 1),
                         ([torch.zeros(4), torch.zeros(9)], 4)):
        assert Request(inputs, None, loop).leading_size() == size, inputs


@pytest.mark.parametrize("failing", [0, 1], ids=["the lead", "another worker"])
def test_a_worker_of_several_that_fails_stops_the_model(caplog, failing):
    """With two workers, one that fails (here on its way back from a batch) ends the model's
    serving as a lone worker's failure does: later requests are refused naming it, the model is
    unhealthy, its other worker exits and the container goes; a close afterwards does not hide
    why. Before, the other worker served on, a later close said the failure, and a failed lead
    (free, on its way back) left every new request waiting for it."""
    ex = DoublingExecutor()
    ex.gate = threading.Event()
    stopped = threading.Event()
    d = Dispatcher(ex, CPU, RuntimeOptions(workers=2), on_stopped=stopped.set)
    take = d.queue.take

    def failing_take(index: int, in_flight: bool) -> object:
        if index == failing and ex.runs:  # it has run a batch
            raise RuntimeError("injected")
        return take(index, in_flight)

    d.queue.take = failing_take  # type: ignore[method-assign]
    loop = PlainLoop()
    first, second = request(torch.tensor(1.0), loop), request(torch.tensor(2.0), loop)
    run_beside(d, ex, first, second)  # the lead holds `first`: the other worker takes `second`
    ex.gate.set()
    loop.drain(2)
    assert [r.result[0].item() for r in (first, second)] == [2.0, 4.0]
    why = f"worker {failing} failed (RuntimeError: injected)"
    assert stopped.wait(10)  # the other worker exited too, and the container went
    assert d.fault is not None and why in d.fault
    assert d.stats()["healthy"] is False
    with pytest.raises(ClosedError, match=rf"worker {failing} failed \(RuntimeError"):
        d.try_submit(request(torch.tensor(3.0), loop))
    d.shutdown(wait=5)
    assert d.fault is not None and why in d.fault
    assert why in caplog.text
