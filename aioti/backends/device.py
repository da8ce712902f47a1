"""A generic backend for other torch devices (xpu, mps): workers without streams of their own;
each batch ends with a device synchronize so results are ready when delivered."""

from __future__ import annotations

import torch

from ..errors import BackendError
from .base import Backend

__all__ = ["SyncDeviceBackend"]


class SyncDeviceBackend(Backend):
    def __init__(self, device: torch.device) -> None:
        module = getattr(torch, device.type, None)
        if module is None or not module.is_available():
            raise BackendError(f"device type {device.type!r} is not available in this process")
        super().__init__(device)
        self.name = device.type
        self._module = module

    def finish(self, ctx: object) -> None:  # ready at once: no token
        self._module.synchronize()
