"""The serving section (`throughput.py --serving`): requests/s and p50/p99 over HTTP on
loopback at concurrency 1/16/64, for the small and mid MLP (batch 8 rows each):

- `aioti serve` (the Open Inference Protocol, JSON; and with Triton's binary tensor data
  extension, as tritonclient sends it for speed), dynamic batching on;
- the peer: LitServe with its batching (`max_batch_size=64`, `batch_timeout` 2 ms) over torch's
  own loader (`aoti_load_package`), as a LitServe user writes it; skipped, and said so, where
  `litserve` cannot be imported (it is not one of aioti's dependencies: `pip install litserve`,
  or `pip install --target DIR litserve` and `LITSERVE_PATH=DIR` to keep it out of this
  environment);
- aioti in-process (`AsyncModel.run` from as many tasks), the floor that HTTP adds to.

The same client drives both servers: as many asyncio tasks, each with a keep-alive connection
of its own, sending a request prepared once (`load_http`; its own time per request is small
next to a server's). Each server runs in a child process of its own. At concurrency 1,
`aioti serve` is also driven by tritonclient's synchronous HTTP client with binary tensors, as
a Triton user's client calls it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import httpx
import torch

import aioti
from aioti.harness import measure, percentile
from aioti.testing import compile_model

LITSERVE = """
import sys, torch, litserve as ls
path, port = sys.argv[1], int(sys.argv[2])
class API(ls.LitAPI):
    def setup(self, device):
        torch.set_num_threads(1)
        self.model = torch._inductor.aoti_load_package(path)
    def decode_request(self, request):
        return torch.tensor(request["input"])
    def batch(self, inputs):
        self.rows = [x.shape[0] for x in inputs]
        return torch.cat(inputs)
    def predict(self, x):
        with torch.no_grad():
            return self.model(x)
    def unbatch(self, output):
        return list(output.split(self.rows))
    def encode_response(self, output):
        return {"output": output.tolist()}
if __name__ == "__main__":
    ls.LitServer(API(), max_batch_size=64, batch_timeout=0.002, accelerator="cpu",
                 workers_per_device=1).run(port=port, generate_client_file=False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], ready_url: str, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited with {proc.returncode}")
        try:
            if httpx.get(ready_url, timeout=1).status_code < 500:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start")


def load_http(url: str, body: bytes, conc: int, duration: float,
              headers: dict[str, str] | None = None) -> dict[str, Any]:
    """`conc` tasks, each on a keep-alive connection of its own, posting `body` to `url` back to
    back for `duration` s: a minimal HTTP/1.1 client over asyncio streams, whose own time per
    request is tens of microseconds (httpx's connection pool, the first client here, cost a
    few milliseconds a request at 64 connections on two cores, and the rows measured it)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = "".join(f"{k}: {v}\r\n" for k, v in {
        "host": f"{host}:{port}", "content-type": "application/json",
        **(headers or {}), "content-length": str(len(body))}.items())
    request = f"POST {parts.path} HTTP/1.1\r\n{head}\r\n".encode() + body
    lat: list[float] = []
    errors = 0

    async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(request)
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise RuntimeError("the load client reads sized responses only")
        await reader.readexactly(length)
        return status

    async def one(stop: float) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                if await exchange(reader, writer) != 200:
                    errors += 1
                lat.append(time.perf_counter() - t0)
        finally:
            writer.close()

    async def go() -> float:
        reader, writer = await asyncio.open_connection(host, port)
        for _ in range(3):  # warm
            await exchange(reader, writer)
        writer.close()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(t0 + duration) for _ in range(conc)))
        return time.perf_counter() - t0

    return _row(lat, asyncio.run(go()), errors)


def _row(lat: list[float], elapsed: float, errors: int) -> dict[str, Any]:
    """A client's figures: requests/s over `elapsed` s, p50 and p99 (ms), failures."""
    return {"requests_per_s": len(lat) / elapsed, "p50_ms": percentile(lat, 50) * 1e3,
            "p99_ms": percentile(lat, 99) * 1e3, "errors": errors}


def tritonclient_c1(port: int, x: torch.Tensor, duration: float) -> dict[str, Any]:
    """Concurrency 1 through tritonclient's synchronous HTTP client, binary in and out."""
    import tritonclient.http as tc

    client = tc.InferenceServerClient(f"127.0.0.1:{port}")
    given = tc.InferInput("input0", list(x.shape), "FP32")
    given.set_data_from_numpy(x.numpy(), binary_data=True)
    wanted = [tc.InferRequestedOutput("output0", binary_data=True)]
    for _ in range(3):  # warm
        client.infer("m", [given], outputs=wanted)
    lat: list[float] = []
    stop = time.perf_counter() + duration
    t0 = time.perf_counter()
    while time.perf_counter() < stop:
        t1 = time.perf_counter()
        client.infer("m", [given], outputs=wanted)
        lat.append(time.perf_counter() - t1)
    elapsed = time.perf_counter() - t0
    client.close()
    return _row(lat, elapsed, 0)


def in_process(path: Path, x: torch.Tensor, conc: int, duration: float) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with aioti.load(path, batching=aioti.Batching(64, 2.0)) as model:
            await model.run([x])
            return await measure(model, [x], conc, duration)

    return anyio.run(go)


def run_serving(duration: float) -> list[dict[str, Any]]:
    rows = []
    for name, width in (("small_mlp", 64), ("mid_mlp", 1024)):
        path = compile_model(name, verbose=True)
        x = torch.randn(8, width)
        oip = json.dumps({"inputs": [{"name": "input0", "shape": [8, width], "datatype": "FP32",
                                      "data": x.flatten().tolist()}]}).encode()
        port = free_port()
        aioti_proc = start([sys.executable, "-m", "aioti", "serve", str(path), "--name", "m",
                            "--batching", "64", "--port", str(port)],
                           f"http://127.0.0.1:{port}/v2/health/ready")
        head = json.dumps({"inputs": [{"name": "input0", "shape": [8, width],
                                       "datatype": "FP32",
                                       "parameters": {"binary_data_size": 32 * width}}],
                           "parameters": {"binary_data_output": True}}).encode()
        binary = head + x.numpy().tobytes()
        infer = f"http://127.0.0.1:{port}/v2/models/m/infer"
        servers = [("aioti serve (OIP JSON, batching 64)", aioti_proc, infer, oip, None),
                   ("aioti serve (OIP binary, batching 64)", aioti_proc, infer, binary,
                    {"Inference-Header-Content-Length": str(len(head)),
                     "content-type": "application/octet-stream"})]
        env = dict(os.environ)
        if os.environ.get("LITSERVE_PATH"):
            env["PYTHONPATH"] = os.pathsep.join([os.environ["LITSERVE_PATH"],
                                                 env.get("PYTHONPATH", "")])
        if subprocess.run([sys.executable, "-c", "import litserve"], env=env,
                          capture_output=True).returncode:
            rows.append({"model": name, "config": "LitServe", "skipped": "litserve not installed"})
            print(rows[-1], flush=True)
        else:
            lport = free_port()
            # a file, not -c: LitServe's worker processes are spawned and import __main__
            script = Path(tempfile.mkdtemp()) / "litserve_peer.py"
            script.write_text(LITSERVE)
            lit = start([sys.executable, str(script), str(path), str(lport)],
                        f"http://127.0.0.1:{lport}/health", env)
            servers.append(("LitServe (batching 64, 2 ms) over aoti_load_package", lit,
                            f"http://127.0.0.1:{lport}/predict",
                            json.dumps({"input": x.tolist()}).encode(), None))
        try:
            for conc in (1, 16, 64):
                for config, _, url, body, extra in servers:
                    row = load_http(url, body, conc, duration, extra)
                    rows.append({"model": name, "config": config, "concurrency": conc, **row})
                    print(rows[-1], flush=True)
                if conc == 1:
                    row = tritonclient_c1(port, x, duration)
                    rows.append({"model": name, "concurrency": 1, **row, "config":
                                 "aioti serve (OIP binary, batching 64, tritonclient sync)"})
                    print(rows[-1], flush=True)
                row = in_process(path, x, conc, duration)
                rows.append({"model": name, "config": "aioti in-process (batching 64)",
                             "concurrency": conc, **row})
                print(rows[-1], flush=True)
        finally:
            for proc in {id(sv[1]): sv[1] for sv in servers}.values():
                proc.terminate()
                proc.wait(60)
    return rows
