"""Experiment: does the interpreter's GIL switch interval move aioti's 4-stream ratio to raw?"""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cuda_section import aioti_tasks, raw_threads  # noqa: E402

from aioti.testing import compile_model  # noqa: E402

path = compile_model("mid_mlp", "cuda", verbose=True)
for batch, streams in ((1, 4), (1, 1), (64, 1)):
    x = torch.randn(batch, 1024, device="cuda")
    for interval in (0.005, 0.001, 0.0002):
        sys.setswitchinterval(interval)
        pairs = [(raw_threads(path, x, streams, 1.5), aioti_tasks(path, x, streams, 1.5))
                 for _ in range(3)]
        ratios = [a["requests_per_s"] / r for r, a in pairs]
        print(f"batch {batch} streams {streams} interval {interval}: raw "
              f"{statistics.median(p[0] for p in pairs):.0f} aioti "
              f"{statistics.median(p[1]['requests_per_s'] for p in pairs):.0f} ratio "
              f"{statistics.median(ratios):.2f} {[round(r, 2) for r in ratios]} lag "
              f"{statistics.median(p[1]['loop_lag_p99_ms'] for p in pairs):.2f}", flush=True)
