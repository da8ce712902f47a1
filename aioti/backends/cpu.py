"""The CPU backend: one worker thread by default.

A compiled CPU model already spreads each run over every core (OpenMP inside its kernels), and a
second worker competes with the first for the GIL and the queue: on the small benchmark model two
workers cost several times the throughput (FACTS). `workers=N` overrides it for models whose runs
are long and single-threaded.
"""

from __future__ import annotations

import torch

from .base import Backend

__all__ = ["CpuBackend"]


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, device: torch.device) -> None:
        super().__init__(torch.device("cpu"))
