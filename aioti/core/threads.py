"""The size of the OpenMP team a thread's native runs fork, set for that thread only.

A CPU model library parallelizes its kernels with OpenMP (`#pragma omp parallel`, team size from
the calling thread's `nthreads` setting). `torch.set_num_threads` would also change process-wide
state (the default for threads torch initializes later, the pthreadpool), so aioti calls the
OpenMP runtime's `omp_set_num_threads` directly: it applies to the calling thread alone.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

__all__ = ["set_thread_team_size"]


@functools.cache
def _omp_set_num_threads() -> Any:
    try:
        return ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError):
        return None


def set_thread_team_size(n: int) -> bool:
    """Make parallel regions started by the calling thread use `n` threads; False when no
    OpenMP runtime is loaded in this process (nothing to set)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    setter = _omp_set_num_threads()
    if setter is None:
        return False
    setter(n)
    return True
