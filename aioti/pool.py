"""`ReplicaPool`: one model over a replica per device - the same calls as `AsyncModel`.

Requests are routed by `runtime.router.Router` (least outstanding rows, inputs' device first,
the pool's backpressure). Constant operations apply to every replica; `hot_swap` stages the new
weights on every replica's inactive buffer and folds them, then swaps them all while no batch
runs on any replica, so that no request started after the swap sees the old weights and none
started before sees the new ones; if staging fails on one replica nothing is swapped and the
error names the replica. A replica that fails as a whole is taken out of routing; its requests
that had not started go to the others, and `check_health` probes whether it recovered.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import anyio
import torch

from .errors import ClosedError, QueueFullError
from .loops import current_loop
from .loops.parking import ParkingLot
from .model import AsyncModel, _in_thread, _ran_here
from .replica import Replica
from .runtime.queue import CLOSED
from .runtime.request import NotStarted, Request
from .runtime.router import Router
from .runtime.stats import Latencies

__all__ = ["ReplicaPool"]


class ReplicaPool(AsyncModel):
    """A model loaded on several devices (`aioti.load(path, device=[...])`)."""

    def __init__(self, files: Any, replicas: Sequence[Replica], *,
                 on_full: Literal["wait", "raise"], move_inputs: bool, room: ParkingLot) -> None:
        super().__init__(files, replicas, on_full=on_full, move_inputs=move_inputs)
        self.router = Router([r.dispatcher for r in self._replicas], self.devices, room)

    @property
    def replicas(self) -> list[Replica]:
        """Each device's replica: its container, backend, runtime and settings."""
        return list(self._replicas)

    async def _submit(self, flat: list[Any], *, boxed: bool = False) -> list[torch.Tensor]:
        """Route, prepare, check and queue on one replica (or run a lone request on this thread
        with the replica's lead, as a single model does: `Dispatcher.run_here_if_idle`); a
        request handed back unstarted (its replica failed) goes again, to another, at most once
        per replica."""
        router = self.router
        flat_given = flat
        first = next((t for t in flat if isinstance(t, torch.Tensor)), None)
        device = first.device if first is not None else None
        handed: NotStarted | None = None
        for _ in range(len(self._replicas) + 1):
            while True:
                if self._closed:
                    raise ClosedError(CLOSED)
                i = router.choose(device)
                if i is None:
                    if not self._on_full_wait:
                        raise QueueFullError(
                            f"every replica's request queue is full ({len(self._replicas)} x "
                            f"{self._dispatcher.queue.max_queue} waiting); try again later")
                    await router.wait_for_room(device)
                    continue
                rep = self._replicas[i]
                tensors, ready = rep.backend.prepare(flat, move_inputs=self._move_inputs)
                layout = rep.container.signature.check(tensors, rep.device,
                                                       full=self.check_inputs)
                req = Request(tensors, ready, current_loop())
                if rep.batcher is not None:
                    rep.batcher.admit(req, layout)
                ran_here = (rep.dispatcher.options.idle_on_loop
                            and rep.dispatcher.run_here_if_idle(req))
                try:
                    if ran_here or rep.dispatcher.try_submit(req):
                        break
                except ClosedError as exc:
                    # Its workers failed (`Workers`) before the router took it out: out now,
                    # and the request goes to another (unless none is left to take it).
                    if self._closed or not router.fault(i, exc):
                        refusal = self._refusal(exc)
                        if refusal is exc:
                            raise
                        raise refusal from exc
            if boxed:  # kept here instead, in case the request must go to another replica
                flat, boxed = list(flat), False
                flat_given.clear()
            del tensors
            try:
                if ran_here:
                    return await _ran_here(rep.dispatcher, req)
                return await req.waiter  # type: ignore[no-any-return]
            except NotStarted as exc:
                handed = exc
            except BaseException:
                rep.dispatcher.cancel(req)
                raise
        assert handed is not None
        raise handed.error

    def stats(self) -> dict[str, Any]:
        """`AsyncModel.stats()` summed over the replicas, with each replica's own (its device,
        whether it is healthy, and why not) under "replicas"."""
        per = []
        for r, routed, taken_out in zip(self._replicas, self.router.healthy, self.router.faults):
            own = r.stats()
            per.append({"device": str(r.device), **own, "healthy": routed and own["healthy"],
                        "fault": taken_out or own["fault"]})
        total: dict[str, Any] = {k: sum(p[k] for p in per) for k in (
            "queued", "running", "completed", "failed", "cancelled", "workers", "max_queue",
            "ran_on_caller_thread")}
        total["latency_s"] = Latencies.merged(
            [r.dispatcher.delivery.latency for r in self._replicas]).percentiles(50, 90, 99)
        total["healthy"] = not self._closed and any(p["healthy"] for p in per)
        faults = [f"replica {i} ({p['device']}): {p['fault']}" for i, p in enumerate(per)
                  if p["fault"]]
        total["fault"] = None if total["healthy"] or self._closed else "; ".join(faults) or None
        total["replicas"] = per
        return total

    @property
    def healthy(self) -> bool:
        """True while one of the replicas serves requests (and the pool is not closed)."""
        return not self._closed and any(self._serving(i) for i in range(len(self._replicas)))

    def _serving(self, i: int) -> bool:
        return self.router.healthy[i] and not self._replicas[i].dispatcher.closing

    async def check_health(self) -> list[bool]:
        """Probe each replica taken out of routing with a one-row run of example inputs; one
        that answers is put back. Returns each replica's health: in routing, with its workers
        alive."""
        for i, r in enumerate(self._replicas):
            if self.router.healthy[i] or r.dispatcher.closing:
                continue
            inputs = r.container.signature.example(r.device, rows=1)
            req = Request(inputs, None, current_loop())
            if r.batcher is not None:
                r.batcher.admit(req)
            try:
                with anyio.fail_after(30):
                    await r.dispatcher.submit(req)
                    await req.waiter
            except Exception:  # noqa: BLE001 - still unhealthy; the fault says why
                continue
            self.router.recovered(i)
        return [self._serving(i) for i in range(len(self._replicas))]

    def _check_open(self) -> None:
        """`ClosedError` once closing began, or once no replica is left to serve."""
        if self._closed or not self._live_replicas():
            raise self._refusal(ClosedError(CLOSED))

    def _refusal(self, error: ClosedError) -> ClosedError:
        """Why the pool refuses: closed as asked; where no replica serves any more, what each
        met; else `error` (the refusal of the replica a request went to)."""
        if self._closed:
            return ClosedError(CLOSED)
        fault = None if self._live_replicas() else self.stats()["fault"]
        return ClosedError(f"no replica serves: {fault}") if fault else error

    def _live_replicas(self) -> list[Replica]:
        return [r for r in self._replicas if r.dispatcher.fault is None]

    async def hot_swap(self, mapping: Mapping[str, Any] | str | os.PathLike[str], *,
                       fold: bool = True) -> None:
        """`AsyncModel.hot_swap` across the replicas: stage and fold on each, then swap all of
        them while no batch runs anywhere. A replica that fails to stage is named in the error,
        and no replica is swapped. Replicas whose workers failed (they serve no more) are left
        out, also when they fail meanwhile."""
        self._check_open()
        loaded = await self._read(mapping)
        reps = self._live_replicas()
        folds = fold and reps[0].container.buffers.folds
        async with self._mutation():
            errors: list[tuple[Replica, BaseException]] = []

            async def stage(r: Replica) -> None:
                try:
                    await _in_thread(lambda: r.container.buffers.stage_constants(loaded))
                    if folds:
                        await _in_thread(
                            lambda: r.container.buffers.fold_constants(inactive=True))
                except Exception as exc:  # noqa: BLE001 - reported below, per replica
                    if r.dispatcher.fault is None:  # else it failed meanwhile: left out
                        errors.append((r, exc))

            async with anyio.create_task_group() as tg:
                for r in reps:
                    tg.start_soon(stage, r)
            if errors:
                r, exc = min(errors, key=lambda e: e[0].index)
                raise type(exc)(f"replica {r.index} ({r.device}): {exc}; no replica was "
                                "swapped") from exc
            await _in_thread(self._swap_all)

    async def swap_constants(self) -> None:
        """Make every replica's inactive buffer active, all while no batch runs anywhere."""
        self._check_open()
        async with self._mutation():
            await _in_thread(self._swap_all)

    def _swap_all(self) -> None:
        live = self._live_replicas()
        with contextlib.ExitStack() as gates:
            for r in live:
                gates.enter_context(r.dispatcher.exclusive())
            for r in live:
                try:
                    r.container.buffers.swap_constants()
                except ClosedError:
                    if r.dispatcher.fault is None:
                        raise
                    # its workers failed meanwhile (its container is gone): it serves no more

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.workers} workers each"
        where = ", ".join(str(d) for d in self.devices)
        return f"<ReplicaPool {self.files.name!r} on {where}, {state}>"
