"""Bounded samples of recent times (request latency, queue wait) and their percentiles."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

__all__ = ["Latencies"]


class Latencies:
    """The most recent `size` times, in seconds (appends are thread-safe: deque's are)."""

    def __init__(self, size: int = 8192) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    @classmethod
    def merged(cls, parts: Sequence[Latencies]) -> Latencies:
        """The samples of several, together (for a total over replicas)."""
        out = cls(sum(p._samples.maxlen or 0 for p in parts) or 1)
        for p in parts:
            out._samples.extend(list(p._samples))
        return out

    def extend(self, values: Iterable[float]) -> None:
        self._samples.extend(values)

    def add(self, value: float) -> None:
        self._samples.append(value)

    def percentiles(self, *qs: float) -> dict[str, float | None]:
        """e.g. {"p50": 0.0012, "p99": 0.004}; None where nothing was recorded yet."""
        data = sorted(self._samples)
        if not data:
            return {f"p{int(q)}": None for q in qs}
        return {f"p{int(q)}": data[min(len(data) - 1, int(q / 100 * len(data)))] for q in qs}
