"""`aioti serve`: the Open Inference Protocol over real HTTP on loopback, driven by tritonclient
(the standard client: sync, and its asyncio client) and plain httpx JSON; Prometheus metrics
parsed with prometheus_client's parser; SIGTERM drain on a real `aioti serve` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import anyio
import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
tritonclient_http = pytest.importorskip("tritonclient.http")

import uvicorn  # noqa: E402

import aioti  # noqa: E402
from aioti.serving import app  # noqa: E402
from aioti.testing import eager_model  # noqa: E402


class Server:
    """An app served by uvicorn on a free loopback port, in a thread of its own."""

    def __init__(self, asgi) -> None:
        self.app = asgi
        self.server = uvicorn.Server(uvicorn.Config(asgi, host="127.0.0.1", port=0,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"127.0.0.1:{port}"
        self.base = f"http://{self.url}"

    def model(self, name):
        return self.app.state.repository.entries[name].model

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def server(models):
    s = Server(app({"small": models["small_mlp"], "multi": models["multi_io"]},
                   batching=None, log=lambda line: None))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def batched(models):
    s = Server(app({"small": models["small_mlp"]}, batching=aioti.Batching(32, 1.0),
                   log=lambda line: None))
    yield s
    s.stop()


def binary_body(x: np.ndarray) -> tuple[bytes, bytes]:
    """An infer request's JSON header and whole body, with `x` as input0's binary data."""
    head = json.dumps({"inputs": [{"name": "input0", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return head, head + x.tobytes()


def raw_request(host: str, model: str, x: np.ndarray, close: bool = False) -> bytes:
    """A whole HTTP/1.1 infer request, to send on a socket of one's own."""
    head, body = binary_body(x)
    return (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}\r\n"
            f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def multi_inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, generator=g), torch.randn(batch, 8, generator=g), \
        torch.rand(8, generator=g) + 0.5


def test_health_and_metadata_with_tritonclient(server):
    client = tritonclient_http.InferenceServerClient(server.url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("multi") and not client.is_model_ready("nope")
    meta = client.get_server_metadata()
    assert meta["name"] == "aioti" and "binary_tensor_data" in meta["extensions"]
    m = client.get_model_metadata("multi")
    assert [i["name"] for i in m["inputs"]] == ["input0", "input1", "scale"]
    assert [i["shape"] for i in m["inputs"]] == [[-1, 16], [-1, 8], [8]]
    assert all(i["datatype"] == "FP32" for i in m["inputs"])
    assert [(o["name"], o["datatype"], o["shape"]) for o in m["outputs"]] == [
        ("sum", "FP32", [-1, 8]), ("pair.0", "FP32", [-1, 8]), ("pair.1", "FP64", [-1, 8])]
    with pytest.raises(Exception, match="unknown model 'nope'"):
        client.get_model_metadata("nope")


def test_json_inference_with_httpx_matches_eager(server):
    x, y, scale = multi_inputs()
    body = {"id": "req-7", "inputs": [
        {"name": "input0", "shape": list(x.shape), "datatype": "FP32", "data": x.flatten().tolist()},
        {"name": "input1", "shape": list(y.shape), "datatype": "FP32", "data": y.tolist()},
        {"name": "scale", "shape": [8], "datatype": "FP32", "data": scale.tolist()},
    ]}
    r = httpx.post(f"{server.base}/v2/models/multi/infer", json=body, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == "multi" and out["id"] == "req-7"
    got = {o["name"]: torch.tensor(o["data"]).reshape(o["shape"]) for o in out["outputs"]}
    ref = eager_model("multi_io")(x, y, scale=scale)
    assert torch.allclose(got["sum"], ref["sum"], atol=1e-5)
    assert torch.allclose(got["pair.0"], ref["pair"][0], atol=1e-5)
    assert out["outputs"][2]["datatype"] == "FP64"
    assert torch.allclose(got["pair.1"].double(), ref["pair"][1], atol=1e-6)
    # the versioned path and a requested subset of outputs
    body["outputs"] = [{"name": "pair.1"}]
    r = httpx.post(f"{server.base}/v2/models/multi/versions/1/infer", json=body, timeout=30)
    assert [o["name"] for o in r.json()["outputs"]] == ["pair.1"]


def test_binary_inference_with_tritonclient_matches_eager(server):
    client = tritonclient_http.InferenceServerClient(server.url)
    x, y, scale = multi_inputs(5, seed=3)
    inputs = []
    for name, t in (("input0", x), ("input1", y), ("scale", scale)):
        i = tritonclient_http.InferInput(name, list(t.shape), "FP32")
        i.set_data_from_numpy(t.numpy(), binary_data=True)
        inputs.append(i)
    outputs = [tritonclient_http.InferRequestedOutput("sum", binary_data=True),
               tritonclient_http.InferRequestedOutput("pair.1", binary_data=False)]
    result = client.infer("multi", inputs, outputs=outputs, request_id="b1")
    ref = eager_model("multi_io")(x, y, scale=scale)
    assert np.allclose(result.as_numpy("sum"), ref["sum"].detach().numpy(), atol=1e-5)
    assert np.allclose(result.as_numpy("pair.1"), ref["pair"][1].detach().numpy(), atol=1e-6)
    assert result.get_response()["id"] == "b1"


def test_200_concurrent_requests_with_batching_and_the_asyncio_client(batched):
    import tritonclient.http.aio as aioclient

    eager = eager_model("small_mlp")
    xs = [torch.randn(1 + i % 3, 64) for i in range(200)]

    async def go():
        client = aioclient.InferenceServerClient(batched.url, conn_limit=200)
        try:
            async def one(x):
                i = tritonclient_http.InferInput("input0", list(x.shape), "FP32")
                i.set_data_from_numpy(x.numpy(), binary_data=True)
                r = await client.infer("small", [i])
                return r.as_numpy("output0")

            results = [None] * len(xs)

            async def run(k):
                results[k] = await one(xs[k])

            async with anyio.create_task_group() as tg:
                for k in range(len(xs)):
                    tg.start_soon(run, k)
            return results
        finally:
            await client.close()

    results = anyio.run(go)
    with torch.no_grad():
        assert all(np.allclose(r, eager(x).numpy(), atol=1e-5) for r, x in zip(results, xs))
    stats = batched.model("small").stats()
    assert max(stats["batching"]["batch_rows"]) > 3  # requests were merged


def post(server, path, **kw):
    return httpx.post(f"{server.base}{path}", timeout=30, **kw)


@pytest.mark.parametrize(("body", "fragment"), [
    ({"inputs": [{"name": "input0", "shape": [2, 64], "datatype": "FP64", "data": [0.0] * 128}]},
     "expected dtype torch.float32"),
    ({"inputs": [{"name": "input0", "shape": [2, 63], "datatype": "FP32", "data": [0.0] * 126}]},
     "expected size 64"),
    ({"inputs": [{"name": "input0", "shape": [2, 64], "datatype": "FP32", "data": [0.0] * 5}]},
     "holds 128 elements, data has 5"),
    ({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]},
     "unknown input 'x'"),
    ({"inputs": []}, "missing inputs ['input0']"),
    ({"inputs": [{"name": "input0", "shape": [1, 64], "datatype": "BYTES", "data": ["a"]}]},
     "datatype 'BYTES' is not supported"),
    ({"inputs": [{"name": "input0", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}],
      "outputs": [{"name": "nope"}]}, "unknown output(s) ['nope']"),
    ({"nothing": 1}, "needs an 'inputs' list"),
])
def test_bad_requests_are_400_with_the_reason(server, body, fragment):
    r = post(server, "/v2/models/small/infer", json=body)
    assert r.status_code == 400 and fragment in r.json()["error"], r.text


def test_bad_bodies_unknown_models_and_binary_sizes(server):
    r = post(server, "/v2/models/small/infer", content=b"{not json")
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = post(server, "/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    head = json.dumps({"inputs": [{"name": "input0", "shape": [1, 64], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 256}}]}).encode()
    r = post(server, "/v2/models/small/infer", content=head + b"\0" * 100,
             headers={"Inference-Header-Content-Length": str(len(head))})
    assert r.status_code == 400 and "binary_data_size 256" in r.json()["error"]
    r = post(server, "/v2/models/small/infer", content=head,
             headers={"Inference-Header-Content-Length": "99999"})
    assert r.status_code == 400 and "the body has" in r.json()["error"]
    r = post(server, "/v2/models/small/infer", json={"inputs": [
        {"name": "input0", "shape": [1, 64], "datatype": ["FP32"], "data": [0.0] * 64}]})
    assert r.status_code == 400 and "datatype ['FP32'] is not supported" in r.json()["error"]


def test_a_version_not_served_is_404(server):
    """Every model serves version "1"; another version is not found, on every endpoint."""
    body = {"inputs": [{"name": "input0", "shape": [1, 64], "datatype": "FP32",
                        "data": [0.0] * 64}]}
    assert post(server, "/v2/models/small/versions/1/infer", json=body).status_code == 200
    for method, endpoint in (("POST", "/infer"), ("GET", ""), ("GET", "/ready")):
        r = httpx.request(method, f"{server.base}/v2/models/small/versions/7{endpoint}",
                          json=body, timeout=30)
        assert r.status_code == 404, (endpoint, r.text)
        assert "has no version '7' (it serves version '1')" in r.json()["error"]


@pytest.mark.parametrize("device", ["cpu", ["cpu", "cpu"]], ids=["model", "pool"])
def test_queue_full_is_503_and_too_large_is_413(models, device):
    s = Server(app({"mid": models["mid_mlp"]}, device=device, workers=1, max_queue=1,
                   max_body_bytes=1 << 20, log=lambda line: None))
    try:
        x = np.random.rand(256, 1024).astype(np.float32)
        head = json.dumps({"inputs": [{"name": "input0", "shape": [256, 1024],
                                       "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        r = post(s, "/v2/models/mid/infer", content=head + x.tobytes(),
                 headers={"Inference-Header-Content-Length": str(len(head))})
        assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
        small = np.random.rand(200, 1024).astype(np.float32)
        head = json.dumps({"inputs": [{"name": "input0", "shape": [200, 1024],
                                       "datatype": "FP32",
                                       "parameters": {"binary_data_size": small.nbytes}}]}
                          ).encode()

        async def burst():
            async with httpx.AsyncClient(timeout=60) as c:
                async def one():
                    return await c.post(f"{s.base}/v2/models/mid/infer",
                                        content=head + small.tobytes(),
                                        headers={"Inference-Header-Content-Length":
                                                 str(len(head))})
                results = []

                async def run():
                    results.append(await one())

                async with anyio.create_task_group() as tg:
                    for _ in range(16):
                        tg.start_soon(run)
                return results

        codes = [r.status_code for r in anyio.run(burst)]
        full = [r for r in anyio.run(burst) if r.status_code == 503]
        assert 200 in codes and 503 in codes
        assert full[0].headers["retry-after"] == "1" and "queue is full" in full[0].json()["error"]
    finally:
        s.stop()


def test_load_unload_and_index(server, models):
    client = tritonclient_http.InferenceServerClient(server.url)
    index = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert index == {"small": "READY", "multi": "READY"}
    client.unload_model("multi")
    assert not client.is_model_ready("multi")
    assert client.is_server_ready()  # an unload takes that model out, not the server
    r = post(server, "/v2/models/multi/infer", json={"inputs": []})
    assert r.status_code == 404
    client.load_model("multi")
    assert client.is_model_ready("multi")
    # a new model from a package on the server's disk, then replaced by another
    r = post(server, "/v2/repository/models/extra/load",
             json={"parameters": {"path": str(models["small_mlp"])}})
    assert r.status_code == 200, r.text
    assert client.get_model_metadata("extra")["inputs"][0]["shape"] == [-1, 64]
    r = post(server, "/v2/repository/models/extra/load",
             json={"parameters": {"path": str(models["mid_mlp"])}})
    assert r.status_code == 200 and client.get_model_metadata("extra")["inputs"][0]["shape"] == \
        [-1, 1024]
    r = post(server, "/v2/repository/models/extra/load", json={"parameters": {"config": "{}"}})
    assert r.status_code == 400 and "unsupported load parameters" in r.json()["error"]
    r = post(server, "/v2/repository/models/extra/load", json={"parameters": ["path"]})
    assert r.status_code == 400 and "parameters must be an object" in r.json()["error"]
    r = post(server, "/v2/repository/models/extra/load", json={"parameters": {"path": 3}})
    assert r.status_code == 400 and "path must be a string, got 3" in r.json()["error"]
    r = post(server, "/v2/repository/models/broken/load",
             json={"parameters": {"path": "/nonexistent.pt2"}})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]
    assert not client.is_server_ready()  # a model that failed to load is not ready
    client.unload_model("broken")
    client.unload_model("extra")
    assert client.is_server_ready()


@pytest.mark.anyio
async def test_hot_swap_under_load_never_fails_or_tears(batched, tmp_path):
    a, b = eager_model("small_mlp"), eager_model("small_mlp")
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(-0.5)
    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    torch.save(a.state_dict(), paths[0])
    torch.save(b.state_dict(), paths[1])
    x = torch.randn(2, 64)
    refs = [a(x).detach(), b(x).detach()]
    body = {"inputs": [{"name": "input0", "shape": [2, 64], "datatype": "FP32",
                        "data": x.flatten().tolist()}]}
    bad, torn, done = [], [], False
    count = 0
    async with httpx.AsyncClient(timeout=60) as client:
        async def caller():
            nonlocal count
            while not done:
                r = await client.post(f"{batched.base}/v2/models/small/infer", json=body)
                if r.status_code != 200:
                    bad.append(r.text)
                    continue
                out = torch.tensor(r.json()["outputs"][0]["data"]).reshape(2, 10)
                count += 1
                if not any(torch.allclose(out, ref, atol=1e-4) for ref in refs):
                    torn.append(out)

        async with anyio.create_task_group() as tg:
            for _ in range(32):
                tg.start_soon(caller)
            for i in range(10):
                r = await client.post(f"{batched.base}/v2/models/small/weights",
                                      json={"path": str(paths[(i + 1) % 2])})
                assert r.status_code == 200 and r.json()["swapped"], r.text
            r = await client.post(f"{batched.base}/v2/models/small/weights",
                                  json={"path": str(tmp_path / "missing.pt")})
            assert r.status_code == 400 and "old weights serve on" in r.json()["error"]
            done = True
        r = await client.post(f"{batched.base}/v2/models/small/infer", json=body)
    assert not bad and not torn and count > 50
    out = torch.tensor(r.json()["outputs"][0]["data"]).reshape(2, 10)
    assert torch.allclose(out, refs[0], atol=1e-4)  # ten swaps: back on a's weights


def test_a_client_that_disconnects_cancels_its_request(models):
    """Queued requests whose clients hang up before an answer never run (counted cancelled),
    and the server goes on."""
    s = Server(app({"mid": models["mid_mlp"]}, workers=1, log=lambda line: None))
    try:
        x = np.random.rand(256, 1024).astype(np.float32)
        head, body = binary_body(x)
        request = raw_request(s.url, "mid", x)
        host, port = s.url.split(":")
        model = s.model("mid")
        ran = model.stats()["completed"]  # the example runs at load

        def wait_for(what: str, n: int) -> None:
            deadline = time.monotonic() + 30
            while model.stats()[what] < n:
                assert time.monotonic() < deadline, model.stats()
                time.sleep(0.01)

        with model._dispatcher.exclusive():  # no batch starts: the requests stay queued
            socks = []
            for _ in range(12):
                sock = socket.create_connection((host, int(port)))
                sock.sendall(request)
                socks.append(sock)
            wait_for("queued", 12)
            for sock in socks:
                sock.close()
            wait_for("cancelled", 12)
        stats = model.stats()
        assert (stats["cancelled"], stats["queued"], stats["completed"]) == (12, 0, ran)
        r = post(s, "/v2/models/mid/infer", content=body,
                 headers={"Inference-Header-Content-Length": str(len(head))})
        assert r.status_code == 200
    finally:
        s.stop()


def test_metrics_parse(server):
    from prometheus_client.parser import text_string_to_metric_families

    body = {"inputs": [{"name": "input0", "shape": [1, 64], "datatype": "FP32",
                        "data": [0.0] * 64}]}
    for _ in range(3):
        assert post(server, "/v2/models/small/infer", json=body).status_code == 200
    post(server, "/v2/models/small/infer", json={"inputs": []})
    text = httpx.get(f"{server.base}/metrics", timeout=30).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    ok = [s for s in fams["aioti_requests"].samples
          if s.name == "aioti_requests_total" and s.labels == {"model": "small", "outcome": "ok"}]
    assert ok and ok[0].value >= 3
    assert any(s.labels.get("outcome") == "bad_request" for s in fams["aioti_requests"].samples)
    for name in ("aioti_request_duration_seconds", "aioti_queue_wait_seconds",
                 "aioti_inference_seconds"):
        counts = [s for s in fams[name].samples if s.name == f"{name}_count"
                  and s.labels.get("model") == "small"]
        assert counts and counts[0].value >= 3, name
    assert {s.labels["model"] for s in fams["aioti_queue_depth"].samples} >= {"small", "multi"}


def test_sigterm_drains_requests_in_flight(models, tmp_path):
    """`aioti serve` as a user runs it: it prints what it loads and where it listens; on
    SIGTERM it stops accepting, finishes the requests in flight, closes the models, exits 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "aioti", "serve", str(models["mid_mlp"]), "--name", "mid",
         "--workers", "1", "--port", str(port), "--drain", "60"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        request = raw_request(f"127.0.0.1:{port}", "mid",
                              np.random.rand(256, 1024).astype(np.float32), close=True)
        socks = []
        for _ in range(8):  # all sent, queued behind one worker, before the signal
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(request)
            socks.append(sock)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        codes = []
        for sock in socks:
            sock.settimeout(120)
            reply = b""
            while chunk := sock.recv(1 << 16):
                reply += chunk
            sock.close()
            codes.append(int(reply.split(b" ", 2)[1]) if reply else 0)
        assert proc.wait(120) == 0
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert codes == [200] * 8, codes
    assert "mid ready - inputs input0: FP32[-1, 1024]" in err and f"127.0.0.1:{port}" in err
    assert "finishing the requests in flight" in err


@pytest.mark.parametrize("device", ["cpu", ["cpu", "cpu"]], ids=["model", "pool"])
def test_a_model_whose_workers_failed_is_not_ready_until_loaded_again(models, device):
    """A model that stopped serving (its workers failed; a pool: every replica's) says so:
    not ready (the model and the server), UNAVAILABLE with the fault in the index, 0 in
    `aioti_replica_healthy`, 503 naming the cause to its requests; loaded again, it serves."""
    from load import break_workers, load_until_unhealthy
    from prometheus_client.parser import text_string_to_metric_families

    s = Server(app({"small": models["small_mlp"]}, device=device, log=lambda line: None))
    client = tritonclient_http.InferenceServerClient(s.url)
    x = torch.randn(2, 64)
    body = {"inputs": [{"name": "input0", "shape": [2, 64], "datatype": "FP32",
                        "data": x.flatten().tolist()}]}

    def healthy_gauges() -> list[float]:
        text = httpx.get(f"{s.base}/metrics", timeout=10).text
        return [m.value for f in text_string_to_metric_families(text)
                for m in f.samples if m.name == "aioti_replica_healthy"]

    try:
        assert client.is_server_ready() and client.is_model_ready("small")
        assert set(healthy_gauges()) == {1.0}
        model = s.model("small")
        break_workers(*(r.dispatcher for r in model._replicas))
        anyio.run(load_until_unhealthy, model, x)
        assert not client.is_model_ready("small") and not client.is_server_ready()
        (entry,) = client.get_model_repository_index()
        assert entry["state"] == "UNAVAILABLE" and "injected into the queue" in entry["reason"]
        assert set(healthy_gauges()) == {0.0}
        r = post(s, "/v2/models/small/infer", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "'small' is not serving" in r.json()["error"]
        assert "injected into the queue" in r.json()["error"]
        r = post(s, "/v2/models/small/weights", json={"path": "/nonexistent.pt"})
        assert r.status_code == 503 and "'small' is not serving" in r.json()["error"]
        client.load_model("small")
        assert client.is_model_ready("small") and client.is_server_ready()
        r = post(s, "/v2/models/small/infer", json=body)
        assert r.status_code == 200, r.text
        with torch.no_grad():
            want = eager_model("small_mlp")(x)
        assert np.allclose(r.json()["outputs"][0]["data"], want.flatten().numpy(), atol=1e-5)
    finally:
        s.stop()


def test_names_of_pytree_places():
    import torch.utils._pytree as pytree

    from aioti.serving.protocol import input_names, output_names

    spec = pytree.tree_structure(((1, {"a": 2}), {"scale": 3, "m": {"k": 4}}))
    assert input_names(spec, 4) == ["input0", "input1.a", "scale", "m.k"]
    assert output_names(pytree.tree_structure(0), 1) == ["output0"]
    assert output_names(pytree.tree_structure((0, 0)), 2) == ["output0", "output1"]
    assert output_names(pytree.tree_structure({"x": 0, "y": (0, 0)}), 3) == \
        ["x", "y.0", "y.1"]


def test_bad_model_options_fail_when_the_app_is_made(models):
    """Not at the server's start, where uvicorn reports "Application startup failed"."""
    with pytest.raises(ValueError, match="max_queue must be >= 1, got 0"):
        app({"small": models["small_mlp"]}, max_queue=0)
    with pytest.raises(TypeError, match="batching must be an aioti.Batching"):
        app({"small": models["small_mlp"]}, batching=8)  # type: ignore[arg-type]


@pytest.mark.parametrize(("meanwhile", "status", "said"), [
    ("load", b"200", b'"model_name":"going"'), ("unload", b"404", b"unknown model 'going'")])
def test_a_model_replaced_or_unloaded_while_a_request_body_arrives(server, models, meanwhile,
                                                                    status, said):
    """The request is run by the model served once its body has arrived: a replacement runs
    it, an unloaded model is not found (was a 500, from the unloaded model's `None`)."""
    r = post(server, "/v2/repository/models/going/load",
             json={"parameters": {"path": str(models["small_mlp"])}})
    assert r.status_code == 200, r.text
    request = raw_request(server.url, "going", np.zeros((2, 64), np.float32), close=True)
    with socket.create_connection(("127.0.0.1", int(server.url.split(":")[1])), 30) as s:
        s.sendall(request[:-8])  # all but the body's last bytes: the endpoint waits for them
        time.sleep(0.3)
        assert post(server, f"/v2/repository/models/going/{meanwhile}").status_code == 200
        s.sendall(request[-8:])
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.split(b"\r\n", 1)[0].startswith(b"HTTP/1.1 " + status), answer[:300]
    assert said in answer
    post(server, "/v2/repository/models/going/unload")
