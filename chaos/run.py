"""`make chaos`: aioti under hostile conditions, every scenario in a child process of its own
with a timeout, one line per scenario with its figures and a summary line; exit 1 if any
scenario failed (a wrong output or exception type, memory growth, a crash, a hang).

    python chaos/run.py [--only NAME[,NAME...]] [--exit-runs N] [--device cuda] [--jobs N]

A scenario holds when it printed its figures, within its timeout, with no wrong outcome and
less than `RSS_LIMIT_MB` of memory growth. Bounded to about ten minutes on two cores (about
seven in practice).

`--device cuda` runs the scenarios that apply to a GPU model (not on-loop batching, a truncated
library, forks or exits) with and without CUDA graphs and on a pool of two replicas of one
GPU; `make chaos` runs them on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
RSS_LIMIT_MB = 50.0

LOOPS = ("asyncio", "trio")
MODES = ("plain", "batched", "on_loop", "pool", "pool_batched", "pool_on_loop")
CUDA_MODES = ("plain", "batched", "graphs", "graphs_batched", "pool", "pool_batched")
CUDA_SCENARIOS = ("cancel_storm", "hot_swap_under_load", "close_under_load", "backpressure",
                  "room_storm", "malformed", "soak", "worker_fault")


def plan(exit_runs: int, device: str = "cpu") -> list[tuple[str, str, str, float]]:
    """(scenario, loop, mode, timeout s)."""
    if device != "cpu":
        rows = [(name, loop, mode, 120.0) for name in CUDA_SCENARIOS for loop in LOOPS
                for mode in CUDA_MODES]
        return rows + [(name, "mixed", mode, 120.0) for name in ("several_loops",
                       "swaps_from_loops") for mode in CUDA_MODES]
    rows = []
    for name, timeout, modes in (
        ("cancel_storm", 90, MODES), ("hot_swap_under_load", 90, MODES),
        ("close_under_load", 60, MODES), ("backpressure", 90, MODES), ("room_storm", 60, MODES),
        ("malformed", 60, MODES), ("soak", 120, MODES),
        ("on_loop_stall", 40, ("on_loop",)), ("truncated_library", 60, ("plain",)),
        # on-loop batches never reach a worker: the modes whose workers run batches
        ("worker_fault", 60, ("plain", "batched", "pool", "pool_batched")),
        # several workers of one model (the small model gets one on the CPU unless told)
        ("cancel_storm", 90, ("workers",)), ("hot_swap_under_load", 90, ("workers",)),
        ("close_under_load", 60, ("workers",)),
    ):
        rows += [(name, loop, mode, timeout) for loop in LOOPS for mode in modes]
    rows += [(name, "mixed", mode, 90) for name in ("several_loops", "swaps_from_loops")
             for mode in MODES]
    rows += [("fork", "asyncio", mode, 60) for mode in MODES]
    rows += [("exit_during_swaps", loop, str(exit_runs), 40.0 + 4 * exit_runs) for loop in LOOPS]
    return rows


def run_one(name: str, loop: str, mode: str, timeout: float) -> tuple[bool, str]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(HERE / "scenarios.py"), name, loop, mode],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"HANG: no result within {timeout:.0f} s"
    took = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else \
            f"exit {proc.returncode}"
        return False, f"CRASH: {how} ({tail[0][:160]})"
    f = json.loads(line[7:])
    ok = f["wrong"] == 0 and f["rss_mb"] < RSS_LIMIT_MB and proc.returncode == 0
    text = (f"sent {f['sent']:6d}  completed {f['completed']:6d}  cancelled {f['cancelled']:5d}  "
            f"failed {f['failed']:5d}  wrong {f['wrong']:3d}  rss +{f['rss_mb']:5.1f} MB  "
            f"{took:5.1f} s")
    if f["note"]:
        text += f"  ({f['note'][:200]})"
    return ok, text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated scenario names")
    ap.add_argument("--exit-runs", type=int, default=30,
                    help="interpreter exits per loop kind in exit_during_swaps")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where the models run (cuda: with and without graphs)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="scenarios at once (each its own process; for machines with cores "
                         "to spare: they compete for them)")
    args = ap.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("chaos: --device cuda needs a CUDA GPU, and this machine has none "
                  "(or a CPU-only torch)", file=sys.stderr)
            return 2
    os.environ["AIOTI_CHAOS_DEVICE"] = args.device
    only = set(args.only.split(",")) if args.only else None
    held = failed = 0
    t0 = time.perf_counter()
    rows = [row for row in plan(args.exit_runs, args.device) if not only or row[0] in only]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        outcomes = pool.map(lambda row: run_one(*row), rows)
        for (name, loop, mode, _), (ok, text) in zip(rows, outcomes):
            held += ok
            failed += not ok
            label = f"{name} {loop} {mode if name != 'exit_during_swaps' else ''}".strip()
            print(f"{'held  ' if ok else 'FAILED'} {label:38} {text}", flush=True)
    print(f"chaos: {held} held, {failed} failed in {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
