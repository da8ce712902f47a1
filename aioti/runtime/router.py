"""`Router`: which replica of a model takes a request, when a model runs on several devices.

Each replica is a whole runtime (`Dispatcher`) on its own device. A request goes to the healthy
replica with the least outstanding work (rows queued plus rows running, not just requests),
ties broken for the replica that took the last request (its threads and caches are warm); a
request whose inputs are already on one replica's device goes to that replica. Backpressure is
the pool's: the replicas' queues share one `ParkingLot` for room, and a caller waits (or gets
`QueueFullError`) only when every replica it may use is full.

A replica whose batch fails as a whole (a device error: the backend's step failed, not one
request's run) is marked unhealthy: its queued requests, and those of the failed batch that
had not begun, are handed back to their callers as `NotStarted`, and the facade submits them
again to another replica; requests that had begun are never run twice. `check` (the facade's
`check_health`) tells whether an unhealthy replica recovered.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ..loops.parking import ParkingLot
from .dispatch import Dispatcher

__all__ = ["Router"]


class Router:
    def __init__(self, dispatchers: Sequence[Dispatcher], devices: Sequence[torch.device],
                 room: ParkingLot) -> None:
        self.dispatchers = list(dispatchers)
        self.devices = list(devices)
        self.healthy = [True] * len(self.dispatchers)
        #: the reason each unhealthy replica was taken out
        self.faults: list[str | None] = [None] * len(self.dispatchers)
        self._room = room
        self._last = 0
        self._lock = threading.Lock()
        # Which replicas serve each device (several CPU replicas share one device).
        self._by_device: dict[torch.device, list[int]] = {}
        for i, d in enumerate(self.devices):
            self._by_device.setdefault(d, []).append(i)
        self._spread = len(self._by_device) > 1

    def choose(self, device: torch.device | None = None) -> int | None:
        """The replica for a request whose inputs are on `device` (None: no preference): the
        least loaded healthy one with room, among that device's replicas where it has any;
        None when every candidate is full (or none is healthy)."""
        candidates: Sequence[int] = range(len(self.dispatchers))
        if self._spread and device is not None:
            on_device = self._by_device.get(device)
            if on_device is not None and any(self.healthy[i] for i in on_device):
                candidates = on_device
        best, best_load = None, 0
        last = self._last
        for i in candidates:
            if not self.healthy[i]:
                continue
            q = self.dispatchers[i].queue
            if q.full:
                continue
            load = q.outstanding
            if best is None or load < best_load or load == best_load and i == last:
                best, best_load = i, load
        if best is not None:
            self._last = best
        return best

    def any_healthy(self) -> bool:
        return any(self.healthy)

    async def wait_for_room(self, device: torch.device | None = None) -> None:
        """Park until a replica this request may use has room (or returns at once if one
        has)."""
        ticket = self._room.park()
        if self.choose(device) is not None or not self.any_healthy():
            self._room.leave(ticket)
            return
        await self._room.wait(ticket, on_lost_turn=self._room.unpark)

    def fault(self, index: int, error: BaseException) -> bool:
        """Replica `index` failed as a whole: take it out of routing (while another is
        healthy), hand its queued requests back to their callers to go elsewhere. Whether it
        is out of routing now."""
        with self._lock:
            if not self.healthy[index]:
                return True
            if sum(self.healthy) <= 1:
                return False  # the last healthy replica keeps serving: nowhere else to go
            self.healthy[index] = False
            self.faults[index] = f"{type(error).__name__}: {error}"
        self.dispatchers[index].hand_back(error)
        self._room.unpark_all()  # callers waiting for room: another replica may have it
        return True

    def recovered(self, index: int) -> None:
        with self._lock:
            self.healthy[index] = True
            self.faults[index] = None
        self._room.unpark_all()
