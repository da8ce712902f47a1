"""The CPU backend: one or two worker threads, chosen by timing one run at load.

A compiled CPU model already spreads each run over the cores (OpenMP inside its kernels). For a
fast model a second worker only competes with the first for the GIL and the queue (measured on
the small benchmark MLP: 36k runs/s with one worker, 20k with two); for a slow one, a second run
overlapping the first's serial parts wins (mid MLP: 960 runs/s with one, 1240 with two). So:
one worker when a probe run takes under 0.5 ms, else two (or the core count, if lower).
`workers=N` overrides it.
"""

from __future__ import annotations

import os

import torch

from .base import Backend

__all__ = ["CpuBackend"]


class CpuBackend(Backend):
    name = "cpu"

    max_auto_workers = min(2, os.cpu_count() or 1)

    def __init__(self, device: torch.device) -> None:
        super().__init__(torch.device("cpu"))

    def auto_workers(self, run_seconds: float) -> int | None:
        return 1 if run_seconds < 0.5e-3 else self.max_auto_workers
