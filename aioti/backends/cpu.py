"""The CPU backend: one or two worker threads, chosen from the model's size, and the size of
the OpenMP team each worker's runs fork.

A compiled CPU model already spreads each run over the cores (OpenMP inside its kernels). For a
fast model a second worker only competes with the first for the GIL and the queue; for a slow
one, a second run overlapping the first's serial parts wins. So: one worker for models with
under 1 MiB of weights, else two (or the core count, if lower). `workers=N` overrides it.

Team size (OpenMP threads per run, set per worker thread before each batch): only the lead
worker forks a team (`ThreadTeams`: more OpenMP threads than cores make every team sleep at its
barriers), of the cores the other workers leave it, `cores - (workers - 1)`, at a size that
stays fixed (libgomp ends and makes threads when a team shrinks and grows). Where that leaves
one core (two workers on two), a batch that runs while no other batch of the model does still
gets every core (a team of one keeps the pool as it is). The other workers run with one thread.
A small model (under 1 MiB) always uses one, as waking a team costs more than its kernels.
`threads=N` at load fixes it at N on every thread.

Why not time a probe run at load: the probe's thread would get an OpenMP team of its own, and
with more OpenMP threads than cores libgomp stops spinning between parallel regions, which
slows small models for the rest of the process. (benchmarks/README.md has the measurements
behind each of these choices.)
"""

from __future__ import annotations

import os

import torch

from .base import Backend

__all__ = ["CpuBackend"]

#: below this many bytes of constants a model counts as small (its runs take microseconds)
SMALL_MODEL_BYTES = 1 << 20


class CpuBackend(Backend):
    name = "cpu"

    max_auto_workers = min(2, os.cpu_count() or 1)

    def __init__(self, device: torch.device) -> None:
        super().__init__(torch.device("cpu"))
        #: torch's thread count when the backend was made (once per process): the cores a
        #: model's team may use (read here, as loads run on threads sized to one)
        self.cores = torch.get_num_threads()

    def auto_workers(self, weight_bytes: int) -> int | None:
        return 1 if weight_bytes < SMALL_MODEL_BYTES else self.max_auto_workers

    def worker_threads(self, weight_bytes: int, workers: int) -> tuple[int, int, int] | None:
        if weight_bytes < SMALL_MODEL_BYTES:
            return 1, 1, 1
        cores = self.cores
        lead = max(1, cores - (workers - 1))
        return (lead, lead, 1) if lead > 1 else (cores, 1, 1)
