"""Prometheus metrics of a server (`prometheus-client`), one registry per app.

Observed per request: `aioti_requests_total{model, outcome}` (ok, bad_request, queue_full,
cancelled, error), `aioti_request_duration_seconds{model}` (HTTP request in, response out) and
`aioti_queue_wait_seconds{model}` and `aioti_inference_seconds{model}` (from the runtime: queued
until its batch began; queued until delivered). Read from the models at scrape time:
`aioti_queue_depth{model, replica}`, `aioti_batch_size{model}` (runs by rows, with batching)
and `aioti_replica_healthy{model, replica}`. Counted by the server: `aioti_hot_swaps_total{model,
outcome}`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

__all__ = ["Metrics"]

_LATENCY = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
            1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, models: Callable[[], Mapping[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("aioti_requests", "Inference requests by outcome",
                                ["model", "outcome"], registry=self.registry)
        self.duration = Histogram("aioti_request_duration_seconds",
                                  "Inference request time in the server", ["model"],
                                  buckets=_LATENCY, registry=self.registry)
        self.queue_wait = Histogram("aioti_queue_wait_seconds",
                                    "Time from queueing to the start of its batch", ["model"],
                                    buckets=_LATENCY, registry=self.registry)
        self.inference = Histogram("aioti_inference_seconds",
                                   "Time from queueing to delivery", ["model"],
                                   buckets=_LATENCY, registry=self.registry)
        self.hot_swaps = Counter("aioti_hot_swaps", "Weight hot swaps", ["model", "outcome"],
                                 registry=self.registry)
        self.registry.register(_ModelsCollector(models))
        self._per_request: dict[tuple[str, str], tuple[Any, Any]] = {}

    def request(self, model: str, outcome: str, seconds: float) -> None:
        """Count one inference request and its time in the server."""
        key = (model, outcome)
        pair = self._per_request.get(key)
        if pair is None:  # labels() looks its child up under a lock: once per model and outcome
            pair = self._per_request[key] = (self.requests.labels(model, outcome),
                                             self.duration.labels(model))
        pair[0].inc()
        pair[1].observe(seconds)

    def observer(self, name: str) -> Callable[[list[float], list[float]], None]:
        """What the runtime calls per delivered batch: (latencies, queue waits) in seconds."""
        wait, total = self.queue_wait.labels(name), self.inference.labels(name)

        def observe(latencies: list[float], waits: list[float]) -> None:
            for v in latencies:
                total.observe(v)
            for v in waits:
                wait.observe(v)

        return observe


class _ModelsCollector:
    """Gauges and the batch-size histogram, read off the models when scraped."""

    def __init__(self, models: Callable[[], Mapping[str, Any]]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("aioti_queue_depth", "Requests waiting in the queue",
                                  labels=["model", "replica"])
        healthy = GaugeMetricFamily("aioti_replica_healthy", "1 if the replica serves",
                                    labels=["model", "replica"])
        sizes = HistogramMetricFamily("aioti_batch_size", "Runs by rows (dynamic batching)",
                                      labels=["model"])
        for name, model in self._models().items():
            stats = model.stats()
            for i, r in enumerate(stats.get("replicas", [stats])):
                replica = f"{i} ({r.get('device', model.device)})"
                depth.add_metric([name, replica], r["queued"])
                healthy.add_metric([name, replica], 1.0 if r["healthy"] else 0.0)
            hist: dict[int, int] = {}
            for r in stats.get("replicas", [stats]):
                for rows, n in (r.get("batching") or {}).get("batch_rows", {}).items():
                    hist[int(rows)] = hist.get(int(rows), 0) + n
            if hist:
                bounds = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
                buckets = []
                for b in bounds:
                    buckets.append((str(b), sum(n for rows, n in hist.items() if rows <= b)))
                total = sum(hist.values())
                buckets.append(("+Inf", total))
                sizes.add_metric([name], buckets, sum(rows * n for rows, n in hist.items()))
        yield depth
        yield healthy
        yield sizes
