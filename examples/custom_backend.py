"""A third-party-style backend: what a plugin for a new device type looks like.

A real plugin registers its factory in its package metadata:

    [project.entry-points."aioti.backends"]
    mydevice = "mypackage.aioti_backend:MyBackend"

and aioti loads it on the first `resolve_backend`. Here we register by hand a backend for CPU
models that counts runs and finished batches (a stand-in for stream hand-over and readiness).
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import anyio
import torch

import aioti


class CountingBackend(aioti.Backend):
    """Runs on CPU, with two workers, counting what the runtime asks of it."""

    name = "cpu"

    def __init__(self, device: torch.device) -> None:
        super().__init__(torch.device("cpu"))
        self.runs = 0
        self.finished_batches = 0
        self._lock = threading.Lock()

    def default_workers(self) -> int:
        return 2

    def begin_batch(self, ctx: Any, readies: list[Any]) -> int | None:
        with self._lock:
            self.runs += len(readies)
        return None  # no stream on CPU

    def finish(self, ctx: Any) -> None:
        with self._lock:
            self.finished_batches += 1


async def main(path: str) -> dict[str, int]:
    aioti.register_backend("cpu", CountingBackend, replace=True)
    try:
        async with aioti.load(path) as model:
            assert isinstance(model.backend, CountingBackend) and model.workers == 2
            for _ in range(4):
                await model(torch.randn(2, 64))
            return {"runs": model.backend.runs, "finished_batches": model.backend.finished_batches}
    finally:
        from aioti.backends.cpu import CpuBackend

        aioti.register_backend("cpu", CpuBackend, replace=True)


if __name__ == "__main__":
    from aioti.testing import compile_model

    print(anyio.run(main, sys.argv[1] if len(sys.argv) > 1 else compile_model("small_mlp")))
