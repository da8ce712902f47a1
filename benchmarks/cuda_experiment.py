"""Why aioti's CUDA workers run slower than raw threads: one variable at a time (batch 1, mid MLP).

A: raw thread, outputs dropped at once; B: outputs kept until a sync every 64 runs, then freed
in the same thread; C: outputs handed to the main thread, which frees them; D: A plus a second
thread holding the GIL in short Python bursts (a stand-in for the event loop).
"""

from __future__ import annotations

import queue
import threading
import time

import torch

from aioti.core import open_container, open_model
from aioti.core.library import handles_from_tensors
from aioti.testing import compile_model

path = compile_model("mid_mlp", "cuda")
x = torch.randn(1, 1024, device="cuda")
c = open_container(open_model(path), device="cuda", num_models=1)


def worker(mode: str, stop: float, out: list[int], q: queue.Queue | None) -> None:
    s = torch.cuda.Stream()
    torch.cuda.set_stream(s)
    h = s.cuda_stream
    n = 0
    while time.perf_counter() < stop:
        kept = []
        for _ in range(64):
            y = c._run(handles_from_tensors([x]), h)
            if mode != "A":
                kept.append(y)
        s.synchronize()
        if q is not None:
            q.put(kept)
        n += 64
        del kept
    out.append(n)
    if q is not None:
        q.put(None)


def run(mode: str, seconds: float = 3.0) -> float:
    out: list[int] = []
    q: queue.Queue | None = queue.Queue() if mode == "C" else None
    stop = time.perf_counter() + seconds
    busy = threading.Event()
    t = threading.Thread(target=worker, args=("A" if mode == "D" else mode, stop, out, q))
    t0 = time.perf_counter()
    t.start()
    if mode == "C":
        while q.get() is not None:
            pass
    if mode == "D":
        while t.is_alive():
            sum(range(200))  # ~5 us of Python, then a GIL release
            busy.wait(0.00002)
    t.join()
    return out[0] / (time.perf_counter() - t0)


for mode in "ABCDA":
    print(mode, round(run(mode)), flush=True)
