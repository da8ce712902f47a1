"""aioti inside Ray Serve (`aioti.ray`) on a real local Ray cluster of two nodes on this machine,
started once for the session: handle and HTTP calls against the eager module under 200
concurrent requests, replicas on both nodes, weights swapped by `reconfigure` under load, a
failed swap that keeps the old weights, a killed replica replaced, shutdown with requests in
flight. Every wait is bounded.

Ray's `DeploymentHandle` responses are awaitable on asyncio only: handle tests run on asyncio;
HTTP tests (any client's view) on asyncio and trio."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from load import FlakyCpuBackend  # noqa: E402

import aioti.ray  # noqa: E402
from aioti.testing import compile_model, eager_model  # noqa: E402

WAIT_S = 120  # the bound of every wait on the cluster


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = _free_port()


@pytest.fixture(scope="session")
def cluster() -> Iterator[str]:
    """Two Ray nodes on this machine and Serve's HTTP proxy; yields the proxy's base URL. The
    head node exports Ray's metrics (Prometheus text) on `METRICS_PORT`."""
    from ray.cluster_utils import Cluster

    compile_model("small_mlp")
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "metrics_export_port": METRICS_PORT})
    c.add_node(num_cpus=2)
    c.wait_for_nodes(timeout=WAIT_S)
    ray.init(address=c.address, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        c.shutdown()


def deploy(name: str, model: str = "small_mlp", **kw: Any) -> Any:
    kw.setdefault("num_replicas", 2)
    kw.setdefault("max_replicas_per_node", 1)
    kw.setdefault("ray_actor_options", {"num_cpus": 0.5})
    app = aioti.ray.deployment(compile_model(model), name=name,
                               **{k: v for k, v in kw.items() if v is not None})
    return serve.run(app, name=name, route_prefix=f"/{name}")


def oip(x: torch.Tensor) -> dict[str, Any]:
    return {"inputs": [{"name": "input0", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.flatten().tolist()}]}


def from_oip(body: dict[str, Any]) -> torch.Tensor:
    out = body["outputs"][0]
    return torch.tensor(out["data"]).reshape(out["shape"])


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def perturbed(seed: int) -> torch.nn.Module:
    m = eager_model("small_mlp")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in m.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g))
    return m


async def replica_stats(handle: Any, replicas: int = 2) -> list[dict[str, Any]]:
    """Each replica's stats: rounds of concurrent calls (which Ray spreads over the replicas),
    until every replica answered, for at most WAIT_S. Ray's router picks by the replicas'
    queue lengths as they answer its probes: on a loaded machine the other node's replica can
    answer late round after round, so the rounds go on until it is seen (with a pause between
    them that lets the router's cached lengths expire), not for a fixed count."""
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + WAIT_S
    while len(seen) < replicas and time.monotonic() < deadline:
        for s in await asyncio.gather(*(handle.stats.remote() for _ in range(32))):
            seen[s["replica"]] = s
        if len(seen) < replicas:
            await asyncio.sleep(0.1)
    return list(seen.values())


@pytest.fixture(scope="session")
def app(cluster: str) -> Any:
    return deploy("mlp")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_handle_calls_match_eager(anyio_backend, app):
    eager = eager_model("small_mlp")
    xs = [torch.randn(1 + i % 4, 64) for i in range(200)]
    got = await asyncio.wait_for(asyncio.gather(*(app.infer.remote(x) for x in xs)), WAIT_S)
    with torch.no_grad():
        assert all(close(g, eager(x)) for g, x in zip(got, xs))
    stats = await replica_stats(app)
    assert len(stats) == 2 and all(s["completed"] > 0 for s in stats)
    assert len({s["node"] for s in stats}) == 2  # max_replicas_per_node=1: one on each node


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_ray_metrics_carry_aiotis_counts(anyio_backend, app):
    """The replicas' requests reach Ray's metrics export (`ray_aioti_requests_total` and the
    histograms, tagged with the model's name): the head node's, which exports its replica's."""
    await asyncio.gather(*(app.infer.remote(torch.randn(1, 64)) for _ in range(50)))
    counted = 0.0
    deadline = time.monotonic() + WAIT_S
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            text = (await client.get(f"http://127.0.0.1:{METRICS_PORT}/metrics")).text
            counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith("ray_aioti_requests_total{")
                          and 'model="mlp"' in line)
            if counted > 0 and "ray_aioti_queue_wait_ms_bucket" in text:
                break
            await asyncio.sleep(1)
    assert counted > 0 and "ray_aioti_latency_ms_bucket" in text


@pytest.mark.anyio
async def test_http_calls_match_eager(anyio_backend, app, cluster):
    eager = eager_model("small_mlp")
    xs = [torch.randn(1 + i % 4, 64) for i in range(200)]
    got: list[torch.Tensor | None] = [None] * len(xs)
    async with httpx.AsyncClient(base_url=cluster, timeout=WAIT_S) as client:
        ready = await client.get("/mlp/v2/models/mlp/ready")
        assert ready.status_code == 200

        async def call(i: int) -> None:
            r = await client.post("/mlp/v2/models/mlp/infer", json=oip(xs[i]))
            assert r.status_code == 200, r.text
            got[i] = from_oip(r.json())

        with anyio.fail_after(WAIT_S):
            async with anyio.create_task_group() as tg:
                for i in range(len(xs)):
                    tg.start_soon(call, i)
    with torch.no_grad():
        assert all(close(g, eager(x)) for g, x in zip(got, xs))  # type: ignore[arg-type]


async def under_load(handle: Any, change: Any, before: Any, after: Any) -> list[str]:
    """Two callers sending 200 calls each while `change()` (a coroutine) runs: each call's
    outcome, "old", "new", "torn" or "failed: ..."."""
    xs = [torch.randn(2, 64) for _ in range(200)]
    with torch.no_grad():
        olds, news = [before(x) for x in xs], [after(x) for x in xs]
    outcomes: list[str] = []

    async def load() -> None:
        for i, x in enumerate(xs):
            try:
                out = await handle.infer.remote(x)
            except Exception as exc:  # noqa: BLE001 - counted
                outcomes.append(f"failed: {exc}")
                continue
            outcomes.append("old" if close(out, olds[i]) else
                            "new" if close(out, news[i]) else "torn")
            await asyncio.sleep(0.002)

    async def delayed() -> None:
        await asyncio.sleep(0.2)
        await change()

    await asyncio.wait_for(asyncio.gather(load(), load(), delayed()), WAIT_S)
    return outcomes


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_weights_swapped_under_load(anyio_backend, cluster, tmp_path):
    """`swap_weights` and Ray's `reconfigure` swap every replica's weights in place while 400
    calls run: none fails, none is torn, later calls see the new weights; a bad weights file
    keeps the old ones, and is reported."""
    handle = deploy("swap")
    old, new, third = eager_model("small_mlp"), perturbed(11), perturbed(12)
    torch.save(new.state_dict(), tmp_path / "new.pt")
    torch.save(third.state_dict(), tmp_path / "third.pt")
    x = torch.randn(3, 64)

    async def swap() -> None:
        done = await aioti.ray.swap_weights(handle, tmp_path / "new.pt")
        assert len(done) == 2 and all(r["error"] is None for r in done)

    outcomes = await under_load(handle, swap, old, new)
    assert {"old", "new"} >= set(outcomes) and outcomes[-1] == "new"
    with torch.no_grad():
        assert all([close(await handle.infer.remote(x), new(x)) for _ in range(8)])

    async def reconfigure() -> None:  # what Ray calls on an in-place user_config change
        await handle.broadcast("reconfigure", {"weights": str(tmp_path / "third.pt")}
                               ).results_async()

    outcomes = await under_load(handle, reconfigure, new, third)
    assert {"old", "new"} >= set(outcomes) and outcomes[-1] == "new"
    assert all(s["swaps"] == 2 and s["swap_error"] is None for s in await replica_stats(handle))

    (tmp_path / "bad.pt").write_bytes(b"not weights")
    with pytest.raises(RuntimeError, match=r"weights not swapped on replica .*bad.pt"):
        await aioti.ray.swap_weights(handle, tmp_path / "bad.pt")
    await handle.broadcast("reconfigure", {"weights": str(tmp_path / "bad.pt")}).results_async()
    with torch.no_grad():
        assert all([close(await handle.infer.remote(x), third(x)) for _ in range(8)])
    assert all("bad.pt" in s["swap_error"] for s in await replica_stats(handle))
    serve.delete("swap")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_redeploy_with_new_weights_replaces_replicas_without_failures(anyio_backend,
                                                                               cluster, tmp_path):
    """`serve.run` from Python starts new replicas, which load `user_config`'s weights as they
    start: the old ones keep answering until then, no call fails or mixes weights."""
    handle = deploy("redeploy")
    old, new = eager_model("small_mlp"), perturbed(11)
    torch.save(new.state_dict(), tmp_path / "new.pt")

    async def redeploy() -> None:
        await asyncio.to_thread(deploy, "redeploy", weights=tmp_path / "new.pt")

    outcomes = await under_load(handle, redeploy, old, new)
    assert {"old", "new"} >= set(outcomes)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert all([close(await handle.infer.remote(x), new(x)) for _ in range(8)])
    serve.delete("redeploy")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_killed_replica_is_replaced(anyio_backend, cluster):
    handle = deploy("kill")
    x = torch.randn(2, 64)
    assert close(await handle.infer.remote(x), eager_model("small_mlp")(x).detach())
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "kill" in a["name"] and "REPLICA" in a["name"]]
    assert len(names) == 2
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    ok = 0
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(handle.infer.remote(x), 30)
            ok += 1
        except Exception:  # noqa: BLE001 - a call routed to the dead replica before it is out
            pass
        status = serve.status().applications["kill"].deployments["aioti-kill"]
        if ok >= 20 and status.replica_states.get("RUNNING") == 2:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"the deployment did not recover within {WAIT_S} s ({ok} calls served)")
    serve.delete("kill")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_shutdown_with_requests_in_flight(anyio_backend, cluster):
    """`serve.delete` while 200 calls are in the replicas: every one of them completes."""
    handle = deploy("drain", "mid_mlp", num_replicas=1, max_replicas_per_node=None)
    eager = eager_model("mid_mlp")
    xs = [torch.randn(64, 1024) for _ in range(200)]
    await handle.infer.remote(xs[0])
    responses = [handle.infer.remote(x) for x in xs]
    await asyncio.sleep(0.2)  # assigned to the replica, and running
    deleted = threading.Thread(target=serve.delete, args=("drain",))
    deleted.start()
    got = await asyncio.wait_for(asyncio.gather(*responses), WAIT_S)
    deleted.join(WAIT_S)
    assert not deleted.is_alive()
    with torch.no_grad():
        assert all(close(g, eager(x)) for g, x in zip(got, xs))
    assert "drain" not in serve.status().applications


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_config_file_builder(anyio_backend, cluster):
    """`import_path: aioti.ray:build` with `args:` (a Serve config file) builds the same app;
    `batching` given as a dict."""
    app = aioti.ray.build({"path": str(compile_model("small_mlp")), "name": "built",
                           "batching": {"max_batch_size": 8, "max_delay_ms": 1.0},
                           "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}})
    handle = serve.run(app, name="built", route_prefix="/built")
    xs = [torch.randn(1, 64) for _ in range(32)]
    got = await asyncio.wait_for(asyncio.gather(*(handle.infer.remote(x) for x in xs)), WAIT_S)
    with torch.no_grad():
        assert all(close(g, eager_model("small_mlp")(x)) for g, x in zip(got, xs))
    (stats,) = await replica_stats(handle, replicas=1)
    assert stats["batching"]["max_rows"] == 8
    await handle.broadcast("check_health").results_async()  # healthy: no error
    serve.delete("built")


@pytest.mark.anyio
async def test_check_health_follows_the_model(anyio_backend, models, other_backend):
    """A replica's health check, outside Ray: healthy while the model serves, failing once it
    is closed, and (a replica pool) while a device is out of routing and fails its probe,
    naming it; once the device answers the probe, the check puts it back and passes (Ray need
    not replace the whole replica for a device that came back)."""
    other_backend(FlakyCpuBackend)
    replica = aioti.ray.AiotiReplica.__new__(aioti.ray.AiotiReplica)
    await replica.__init__(str(models["small_mlp"]), "m",
                           {"device": ["cpu", "privateuseone:0"]})
    try:
        await replica.check_health()
        FlakyCpuBackend.broken.set()
        replica.model.router.fault(1, RuntimeError("device lost"))
        with pytest.raises(RuntimeError, match=r"devices out of routing: .*device lost"):
            await replica.check_health()  # its probe fails too
        FlakyCpuBackend.broken.clear()
        await replica.check_health()  # the probe answers: back in routing
        assert replica.model.stats()["replicas"][1]["healthy"]
    finally:
        FlakyCpuBackend.broken.clear()
        await replica.model.aclose()
    with pytest.raises(RuntimeError, match="the aioti model is closed"):
        await replica.check_health()


@pytest.mark.anyio
async def test_check_health_fails_once_the_models_workers_failed(anyio_backend, models):
    """A replica whose model stopped serving (its worker failed: no one closed it) fails its
    health check naming the fault, so that Ray starts a new one."""
    from load import break_workers, load_until_unhealthy

    replica = aioti.ray.AiotiReplica.__new__(aioti.ray.AiotiReplica)
    await replica.__init__(str(models["small_mlp"]), "m", {})
    try:
        await replica.check_health()
        break_workers(replica.model._dispatcher)
        await load_until_unhealthy(replica.model, torch.randn(2, 64))
        with pytest.raises(RuntimeError, match=r"serves no more requests: .*injected"):
            await replica.check_health()
    finally:
        await replica.model.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_config_file_deploys(anyio_backend, cluster, tmp_path):
    """A Serve config file naming `aioti.ray:build`, deployed the way `serve deploy` has the
    controller deploy it (the controller imports the builder and calls it with `args`); then
    the same file with new weights in `user_config`: Ray applies it in place, the running
    replica swaps its weights (`reconfigure`)."""
    import yaml
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    text = f"""
applications:
  - name: fromfile
    route_prefix: /fromfile
    import_path: aioti.ray:build
    args:
      path: {compile_model("small_mlp")}
      name: fromfile
      batching: {{max_batch_size: 8, max_delay_ms: 1.0}}
      num_replicas: 1
      ray_actor_options: {{num_cpus: 0.5}}
"""
    client = serve_start()
    client.deploy_apps(ServeDeploySchema.model_validate(yaml.safe_load(text)), _blocking=True)
    handle = serve.get_app_handle("fromfile")
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert close(await handle.infer.remote(x), eager_model("small_mlp")(x))
    (first,) = await replica_stats(handle, replicas=1)

    new = perturbed(13)
    torch.save(new.state_dict(), tmp_path / "new.pt")
    text += ("    deployments:\n      - name: aioti-fromfile\n"
             f"        user_config: {{weights: {tmp_path / 'new.pt'}}}\n")
    client.deploy_apps(ServeDeploySchema.model_validate(yaml.safe_load(text)), _blocking=True)
    deadline = time.monotonic() + WAIT_S
    with torch.no_grad():
        while not close(await handle.infer.remote(x), new(x)):
            assert time.monotonic() < deadline, "the new weights were not applied"
            await asyncio.sleep(0.2)
    (now,) = await replica_stats(handle, replicas=1)
    assert now["replica"] == first["replica"] and now["swaps"] == 1  # in place
    serve.delete("fromfile")


@pytest.mark.parametrize(("build", "named"), [
    (lambda: aioti.ray.deployment("m.pt2", workers=0), "workers must be >= 1, got 0"),
    (lambda: aioti.ray.deployment("m.pt2", max_queue="8"), "max_queue must be an int"),
    (lambda: aioti.ray.deployment("m.pt2", batching={"max_batch_size": 8}),
     "batching must be an aioti.Batching"),
    (lambda: aioti.ray.build({"name": "m"}), "needs args.path"),
])
def test_bad_deployment_options_fail_where_they_are_given(build, named):
    """Not in every replica as it starts (where Ray would retry them), and with no cluster."""
    with pytest.raises((TypeError, ValueError), match=named):
        build()
