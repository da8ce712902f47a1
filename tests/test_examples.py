"""Every example runs: the services over real loopback sockets, with many concurrent clients."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
import torch

from aioti.testing import eager_model

pytestmark = pytest.mark.anyio
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=[[], ["--batching", "64", "--on-loop"]], ids=["plain", "on_loop"])
def asyncio_service(models, request):
    for name in ("starlette", "uvicorn"):  # `make test` installs both (the dev extra)
        pytest.importorskip(name, reason=f"the asyncio service example needs {name}")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "asyncio_service.py"),
                             str(models["small_mlp"]), "--port", str(port), *request.param])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/stats", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the asyncio service did not start")
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_service(asyncio_service, tmp_path):
    eager = eager_model("small_mlp")
    xs = [torch.randn(2, 64) for _ in range(200)]
    async with httpx.AsyncClient(base_url=asyncio_service, timeout=30) as client:
        results = [None] * len(xs)

        async def call(i):
            r = await client.post("/predict", json={"inputs": xs[i].tolist()})
            results[i] = r

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(len(xs)):
                    tg.start_soon(call, i)
        for x, r in zip(xs, results):
            assert r.status_code == 200
            assert torch.allclose(torch.tensor(r.json()["outputs"]), eager(x), atol=1e-4)
        bad = await client.post("/predict", json={"inputs": [[1.0, 2.0]]})
        assert bad.status_code == 422 and "expected size 64" in bad.json()["error"]
        for path, body in (("/predict", b"{not json"), ("/predict", b"[1]"),
                           ("/hot-swap", b"{not json"), ("/hot-swap", b'{"state_dict": 3}')):
            bad = await client.post(path, content=body)
            assert bad.status_code == 422, (path, body, bad.text)
        sd = {k: v + 0.5 for k, v in eager.state_dict().items()}
        torch.save(sd, tmp_path / "w.pt")
        assert (await client.post("/hot-swap", json={"state_dict": str(tmp_path / "w.pt")})).json()
        eager.load_state_dict(sd)
        r = await client.post("/predict", json={"inputs": xs[0].tolist()})
        assert torch.allclose(torch.tensor(r.json()["outputs"]), eager(xs[0]), atol=1e-4)
        await client.post("/rollback")
        stats = (await client.get("/stats")).json()
        assert stats["completed"] >= 201 and stats["failed"] == 0
        health = await client.get("/healthz")
        assert health.status_code == 200 and health.json() == {"healthy": True, "fault": None}
        if "batching" in stats:  # --on-loop: concurrent HTTP requests merged into fewer runs
            assert stats["batching"]["runs"] < stats["completed"]


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_trio_service(models):
    import trio
    import trio_service

    eager = eager_model("small_mlp")
    xs = [torch.randn(3, 64) for _ in range(50)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(trio_service.serve, str(models["small_mlp"]), 0)
            answers = {}

            async def client(i):
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(json.dumps({"inputs": xs[i].tolist()}).encode() + b"\n")
                    buf = b""
                    while not buf.endswith(b"\n"):
                        buf += await stream.receive_some()
                    answers[i] = json.loads(buf)

            async with trio.open_nursery() as clients:
                for i in range(len(xs)):
                    clients.start_soon(client, i)
            nursery.cancel_scope.cancel()
    for i, x in enumerate(xs):
        assert torch.allclose(torch.tensor(answers[i]["outputs"]), eager(x), atol=1e-4)


async def test_hot_swap_example(models):
    import hot_swap

    seen = await hot_swap.main(str(models["small_mlp"]))
    assert seen["old"] > 0 and seen["new"] > 0


def test_pytest_harness_example():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(EXAMPLES / "pytest_harness")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "4 passed" in proc.stdout


def test_cli(models, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "aioti", *args], capture_output=True,
                              text=True, timeout=300)

    info = cli("info", str(models["multi_io"]), "--json")
    assert info.returncode == 0
    data = json.loads(info.stdout)
    assert data["run_loop"] == "native"
    assert data["models"] == ["model"] and len(data["inputs"]) == 3
    assert "kwargs['scale']" in data["inputs"][2]["name"]
    torch.save((torch.randn(4, 16), torch.randn(4, 8)), tmp_path / "in.pt")
    bad = cli("run", str(models["multi_io"]), "--input", str(tmp_path / "in.pt"))
    assert bad.returncode == 1 and bad.stderr.startswith("aioti: error:")
    assert "Traceback" not in bad.stderr
    x, y, scale = torch.randn(4, 16), torch.randn(4, 8), torch.rand(8) + 0.5
    torch.save({"args": (x, y), "kwargs": {"scale": scale}}, tmp_path / "both.pt")
    both = cli("run", str(models["multi_io"]), "--input", str(tmp_path / "both.pt"),
               "--output", str(tmp_path / "out.pt"))
    assert both.returncode == 0, both.stderr
    expect = eager_model("multi_io")(x, y, scale=scale)
    assert torch.allclose(torch.load(tmp_path / "out.pt")["sum"], expect["sum"], atol=1e-5)
    torch.save(torch.randn(4, 64), tmp_path / "x.pt")
    ok = cli("run", str(models["small_mlp"]), "--input", str(tmp_path / "x.pt"),
             "--output", str(tmp_path / "y.pt"))
    assert ok.returncode == 0 and "output 0: (4, 10)" in ok.stdout
    assert torch.load(tmp_path / "y.pt").shape == (4, 10)
    missing = cli("info", str(tmp_path / "nope.pt2"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    notpkg = tmp_path / "text.pt2"
    notpkg.write_text("x")
    assert "not a .pt2" in cli("info", str(notpkg)).stderr
    bench = cli("bench", str(models["small_mlp"]), "--duration", "0.5", "--concurrency", "8",
                "--backend", "trio", "--json", str(tmp_path / "b.json"))
    assert bench.returncode == 0, bench.stderr
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["requests"] > 0 and b["c1_p50_ms"] > 0 and b["direct_p50_ms"] > 0
    assert b["direct_measured_in"] == "child process"  # apart from the model's OpenMP team
    assert "one caller (c1): p50" in bench.stdout
    on_loop = cli("bench", str(models["small_mlp"]), "--duration", "0.5", "--batching", "16",
                  "--on-loop", "--rows", "1", "--no-c1", "--json", str(tmp_path / "c.json"))
    assert on_loop.returncode == 0, on_loop.stderr
    row = json.loads((tmp_path / "c.json").read_text())
    assert row["errors"] == 0 and row["rows"] == 1
    assert row["batch_rows"] and all(1 <= int(n) <= 16 for n in row["batch_rows"])
    assert "needs --batching" in cli("bench", str(models["small_mlp"]), "--on-loop").stderr
    pool = cli("bench", str(models["small_mlp"]), "--device", "cpu,cpu", "--duration", "0.5",
               "--concurrency", "16", "--json", str(tmp_path / "d.json"))
    assert pool.returncode == 0, pool.stderr
    per = json.loads((tmp_path / "d.json").read_text())["per_replica"]
    assert len(per) == 2 and all(n > 0 for n in per.values())
    both = cli("info", str(models["small_mlp"]), "--device", "cpu,cpu", "--json")
    assert json.loads(both.stdout)["loaded_on"] == ["cpu", "cpu"]


@pytest.mark.parametrize(("args", "named"), [
    (["bench", "m.pt2", "--concurrency", "0"], "--concurrency: expected an int >= 1, got '0'"),
    (["bench", "m.pt2", "--duration", "nan"], "--duration: expected seconds > 0, got 'nan'"),
    (["bench", "m.pt2", "--duration", "-1"], "--duration: expected seconds > 0"),
    (["bench", "m.pt2", "--rows", "1.5"], "--rows: expected an int >= 1, got '1.5'"),
    (["bench", "m.pt2", "--batching", "0"], "--batching: expected an int >= 1"),
    (["serve", "m.pt2", "--port", "99999"], "--port: expected a port from 0 to 65535"),
    (["serve", "m.pt2", "--max-queue", "0"], "--max-queue: expected an int >= 1"),
    (["serve", "m.pt2", "--workers", "-2"], "--workers: expected an int >= 1"),
])
def test_cli_refuses_bad_arguments_before_loading(args, named, capsys):
    """Usage errors (exit 2) naming the argument; a port over 65535 once left `serve` hung."""
    from aioti.cli import main

    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2 and named in capsys.readouterr().err


def test_serve_says_in_one_line_when_a_package_is_not_one(tmp_path, capsys):
    """A missing, unreadable or model-less package stops `aioti serve` before its server
    starts, in one line (it was a traceback of the server's failed start, exit 3)."""
    import zipfile

    pytest.importorskip("uvicorn")
    from aioti.cli import main

    text, empty = tmp_path / "text.pt2", tmp_path / "empty.pt2"
    text.write_text("hello")
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("model/archive_format", "pt2")
    for path, said in [(tmp_path / "nope.pt2", "does not exist or is not a file"),
                       (text, "is not a .pt2 package"),
                       (empty, "holds no AOTInductor model")]:
        assert main(["serve", str(path), "--port", "0"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("aioti: error: ") and said in err and err.count("\n") == 1


def test_cli_run_says_when_its_input_file_is_not_one(models, tmp_path, capsys):
    from aioti.cli import main

    text = tmp_path / "in.pt"
    text.write_text("hello")
    assert main(["run", str(models["small_mlp"]), "--input", str(text)]) == 1
    assert "is not a torch.save file of tensors" in capsys.readouterr().err
    assert main(["run", str(models["small_mlp"]), "--input", str(tmp_path / "nope.pt")]) == 1
    assert "cannot read --input" in capsys.readouterr().err
