"""aioti inside Ray Serve: a ready deployment whose replicas each hold an aioti model (the `ray`
extra: `pip install 'aioti[ray]'`).

    from ray import serve
    import aioti.ray

    app = aioti.ray.deployment("model.pt2", device="cuda", num_replicas=2,
                               ray_actor_options={"num_gpus": 1})
    handle = serve.run(app)
    y = await handle.infer.remote(x)          # Python callers: tensors in, the model's pytree out
    # HTTP callers: the Open Inference Protocol at Ray's proxy, /v2/models/<name>/infer

Ray Serve schedules, scales and restarts the replicas; aioti runs the model in each: calls
through the replica's event loop without blocking it, concurrent requests batched
(`batching=`), weights swapped while serving. A replica's HTTP ingress is the same ASGI app as
`aioti serve` (`aioti.serving.app`), over the replica's own model.

- Weights: `await aioti.ray.swap_weights(handle, PATH)` hot-swaps every live replica's weights
  from a weights file (`.safetensors` or `torch.save`) while they serve; every response is from
  one weight set; a replica that fails keeps its old weights and is named in the error. Ray's
  `reconfigure(user_config)` with `{"weights": PATH}` does the same on each replica when Ray
  applies a `user_config` change in place (a config-file redeploy, `serve deploy`), and at a
  replica's start; a failure there is reported in the replica's `stats()["swap_error"]` and its
  log, not raised (Ray would restart the replica with the same config, failing again). A
  `serve.run(...)` from Python always starts new replicas (Ray versions each such deploy
  anew): they load the new `user_config`'s weights as they start, replacing the old ones
  rolling, without failed requests.
- `check_health`: fails once the model is closed or stops serving (a worker failed: Ray
  starts a new replica), or (a replica pool) while one of its devices is out of routing and
  fails a probe (one that answers is put back, and the check passes).
- Shutdown (`serve.delete`, scale-down, `serve.shutdown`): the model closes after finishing the
  requests it holds (the replica's HTTP app owns it, and Ray ends the app's lifespan).
- Ray's metrics (`ray.serve.metrics`): `aioti_requests` (requests delivered), `aioti_latency_ms`
  and `aioti_queue_wait_ms` histograms, `aioti_delivered_batch` (requests delivered together),
  tagged with the model's name.
- `max_ongoing_requests` defaults to the model's `max_queue`, so that Ray stops sending to a
  replica when aioti's queue is full rather than queueing behind it.

For Ray Serve config files (`serve deploy config.yaml`), `aioti.ray:build` is an application
builder: `import_path: aioti.ray:build` with `args:` holding `deployment`'s arguments.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ray import serve

from .loader import check_options
from .model import AsyncModel
from .runtime.batching import Batching
from .runtime.graphs import CudaGraphs

__all__ = ["AiotiDeployment", "AiotiReplica", "build", "deployment", "swap_weights"]


class AiotiReplica:
    """One Ray Serve replica: an aioti model, its HTTP app, its weights updates."""

    async def __init__(  # type: ignore[misc]  # Ray awaits an async constructor
            self, path: str, name: str, load_options: dict[str, Any]) -> None:
        import aioti

        self.name = name
        self.model: AsyncModel = await aioti.load(path, **load_options)
        self.swaps = 0
        self.swap_error: str | None = None
        self._weights: str | None = None
        self.model.observe(_ray_metrics(name))

    def __serve_build_asgi_app__(self) -> Any:
        """The replica's HTTP ingress: the Open Inference Protocol over its model."""
        from .serving import app

        return app({self.name: self.model}, log=lambda line: None)

    async def infer(self, *args: Any, **kwargs: Any) -> Any:
        """A call of the model (tensors in, its pytree out), for `DeploymentHandle` callers."""
        return await self.model(*args, **kwargs)

    async def reconfigure(self, user_config: Mapping[str, Any]) -> None:
        """Ray calls this with the deployment's `user_config` at start and on every change:
        `{"weights": PATH}` swaps the weights in while the replica serves."""
        weights = (user_config or {}).get("weights")
        if weights and os.fspath(weights) != self._weights:
            # Not raised on failure: Ray would restart the replica with the same config,
            # failing again. The old weights keep serving, and the replica says so.
            await self.swap_weights(os.fspath(weights))

    async def swap_weights(self, weights: str) -> dict[str, Any]:
        """Hot-swap this replica's weights from a weights file (`aioti.ray.swap_weights` calls
        it on every replica): its outcome, the error in it when the old weights stay."""
        try:
            await self.model.hot_swap(weights)
        except Exception as exc:  # noqa: BLE001 - reported, the old weights keep serving
            self.swap_error = f"{weights}: {type(exc).__name__}: {exc}"
            logging.getLogger("ray.serve").error("aioti: weights not swapped: %s",
                                                 self.swap_error)
        else:
            self._weights, self.swap_error = weights, None
            self.swaps += 1
        return {"replica": _replica_id(), "weights": self._weights, "error": self.swap_error}

    async def check_health(self) -> None:
        """Ray's periodic check; an exception makes Ray replace this replica. A replica pool's
        devices out of routing are probed first (`check_health` of the model): one that
        answers is back, and only one still failing fails the check."""
        if self.model.closed:
            raise RuntimeError("the aioti model is closed")
        await self.model.check_health()
        stats = self.model.stats()
        if not stats["healthy"]:  # its workers failed: a new replica serves, this one cannot
            raise RuntimeError(f"the aioti model serves no more requests: {stats['fault']}")
        replicas = stats.get("replicas")
        if replicas and not all(r["healthy"] for r in replicas):
            down = [f"{r['device']}: {r['fault']}" for r in replicas if not r["healthy"]]
            raise RuntimeError(f"devices out of routing: {'; '.join(down)}")

    def stats(self) -> dict[str, Any]:
        """The model's `stats()`, with this replica's weight swaps."""
        import ray

        return {**self.model.stats(), "swaps": self.swaps, "weights": self._weights,
                "swap_error": self.swap_error, "replica": _replica_id(),
                "node": ray.get_runtime_context().get_node_id()}


def _replica_id() -> str:
    return str(serve.get_replica_context().replica_id.unique_id)


#: the deployment (each `deployment(...)` call binds it with its own options)
AiotiDeployment: Any = serve.deployment(serve.ingress()(AiotiReplica))


def _ray_metrics(name: str) -> Any:
    """A model observer that records into Ray Serve's metrics."""
    from ray.serve import metrics

    tags = {"model": name}
    requests = metrics.Counter("aioti_requests", description="requests delivered",
                               tag_keys=("model",))
    bounds = [0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]
    latency = metrics.Histogram("aioti_latency_ms", description="call to result (ms)",
                                boundaries=bounds, tag_keys=("model",))
    wait = metrics.Histogram("aioti_queue_wait_ms", description="call to batch start (ms)",
                             boundaries=bounds, tag_keys=("model",))
    batch = metrics.Histogram("aioti_delivered_batch", description="requests delivered together",
                              boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("model",))

    def observe(latencies: list[float], waits: list[float]) -> None:
        requests.inc(len(latencies), tags=tags)
        batch.observe(len(latencies), tags=tags)
        for s in latencies:
            latency.observe(s * 1e3, tags=tags)
        for s in waits:
            wait.observe(s * 1e3, tags=tags)

    return observe


def deployment(
    path: str | os.PathLike[str],
    *,
    name: str = "model",
    device: str | torch.device | Sequence[str | torch.device] = "cpu",
    batching: Batching | None = None,
    workers: int | None = None,
    max_queue: int = 256,
    cuda_graphs: CudaGraphs | None = None,
    weights: str | os.PathLike[str] | None = None,
    **ray_options: Any,
) -> serve.Application:
    """A bound Ray Serve application whose replicas each load the package at `path` with
    aioti (`device`, `batching`, `workers`, `max_queue`, `cuda_graphs` are `aioti.load`'s;
    `weights` a weights file to serve instead of the package's, through `user_config`, so that
    a later `user_config` change swaps it). `name` is the model's name over HTTP. Every other
    keyword is a Ray Serve deployment option (`num_replicas`, `autoscaling_config`,
    `ray_actor_options`, `max_ongoing_requests` - by default the model's `max_queue` -,
    `user_config`, `health_check_period_s`, ...). Usable with `serve.run(app)`."""
    check_options(workers=workers, max_queue=max_queue, batching=batching,
                  cuda_graphs=cuda_graphs)
    options = dict(ray_options)
    options.setdefault("max_ongoing_requests", max_queue)
    options.setdefault("name", f"aioti-{name}")
    if weights is not None:
        options["user_config"] = {**options.get("user_config", {}), "weights": os.fspath(weights)}
    load_options = {"device": device, "batching": batching, "workers": workers,
                    "max_queue": max_queue, "cuda_graphs": cuda_graphs}
    return AiotiDeployment.options(**options).bind(os.fspath(path), name, load_options)


async def swap_weights(handle: Any, weights: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Hot-swap the weights of every live replica of the deployment behind `handle` (a
    `DeploymentHandle`) from a weights file that each replica's machine can read, in parallel,
    while they serve. Returns each replica's outcome; raises `RuntimeError` naming the replicas
    that failed (they keep their old weights)."""
    results = await handle.broadcast("swap_weights", os.fspath(weights)).results_async()
    failed = [r for r in results if r["error"]]
    if failed:
        raise RuntimeError("weights not swapped on " + "; ".join(
            f"replica {r['replica']}: {r['error']}" for r in failed))
    return list(results)


def build(args: dict[str, Any]) -> serve.Application:
    """An application builder for Ray Serve config files: `args` are `deployment`'s keywords
    (`path` required; `batching` may be a dict of `aioti.Batching`'s fields)."""
    args = dict(args)
    if "path" not in args:
        raise ValueError("aioti.ray:build needs args.path: the package to serve")
    if isinstance(args.get("batching"), dict):
        args["batching"] = Batching(**args["batching"])
    if isinstance(args.get("cuda_graphs"), dict):
        args["cuda_graphs"] = CudaGraphs(**args["cuda_graphs"])
    return deployment(args.pop("path"), **args)
