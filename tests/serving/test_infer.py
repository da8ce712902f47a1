"""The infer endpoint's own parts, on asyncio and trio, with a real model and no HTTP: which
paths it takes, and the disconnect watcher (a run whose client leaves is cancelled; a run that
finishes leaves no watcher behind). The endpoint over real HTTP is tests/test_serving.py."""

from __future__ import annotations

import threading

import anyio
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

import aioti  # noqa: E402
from aioti.serving import infer  # noqa: E402
from aioti.testing import eager_model  # noqa: E402

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("path", "root", "name"), [
    ("/v2/models/m/infer", "", "m"),
    ("/v2/models/m/versions/1/infer", "", "m"),
    ("/api/v2/models/m/infer", "/api", "m"),  # mounted below /api
    ("/v2/models/m/ready", "", None),
    ("/v2/models//infer", "", None),
    ("/v2/models/m/versions//infer", "", None),
    ("/v2/models/m/x/infer", "", None),
    ("/v1/models/m/infer", "", None),
    ("/api/v2/models/m/infer", "", None),
])
async def test_infer_paths(path: str, root: str, name: str | None) -> None:
    assert infer.infer_target({"path": path, "root_path": root}) == name


class Client:
    """`receive` as a server gives it once the body has arrived: it waits until the client
    leaves (`leave`), then says `http.disconnect`; it never answers otherwise (as a Ray Serve
    replica's after the response). `waiting`: calls waiting now."""

    def __init__(self) -> None:
        self.gone = anyio.Event()
        self.waiting = self.calls = 0

    async def receive(self) -> dict[str, str]:
        self.waiting += 1
        self.calls += 1
        try:
            await self.gone.wait()
        finally:
            self.waiting -= 1
        return {"type": "http.disconnect"}

    def leave(self) -> None:
        self.gone.set()


async def test_a_run_whose_client_stays_returns_and_leaves_no_watcher(models) -> None:
    """The watcher waits on `receive` while the model runs and is gone once the run returns,
    whether or not the server ever answers `receive` again."""
    eager = eager_model("small_mlp")
    x = torch.randn(3, 64)
    async with aioti.load(models["small_mlp"]) as model:
        client = Client()
        out = await infer.run_unless_disconnected(model, [x], client.receive)
        assert out is not None and torch.allclose(out[0], eager(x), atol=1e-5)
        with anyio.fail_after(10):
            while client.waiting:
                await anyio.sleep(0.001)
        assert client.calls <= 1 and model.stats()["cancelled"] == 0


async def test_a_client_that_leaves_cancels_its_queued_run(models) -> None:
    async with aioti.load(models["small_mlp"], workers=1) as model:
        ran = model.stats()["completed"]
        hold, held = threading.Event(), threading.Event()

        def hold_runs() -> None:
            with model._dispatcher.exclusive():  # no batch starts: the request stays queued
                held.set()
                hold.wait(30)

        client = Client()
        async with anyio.create_task_group() as tg:
            tg.start_soon(anyio.to_thread.run_sync, hold_runs)
            with anyio.fail_after(30):
                while not held.is_set():
                    await anyio.sleep(0.001)
                result: list[object] = []

                async def call() -> None:
                    result.append(await infer.run_unless_disconnected(
                        model, [torch.randn(2, 64)], client.receive))

                tg.start_soon(call)
                while model.stats()["queued"] < 1:
                    await anyio.sleep(0.001)
                client.leave()
                while not result:
                    await anyio.sleep(0.001)
            hold.set()
        assert result == [None]
        stats = model.stats()
        assert (stats["cancelled"], stats["queued"], stats["completed"]) == (1, 0, ran)
        out = await model.run([torch.randn(2, 64)])  # the model serves on
        assert out[0].shape == (2, 10)


async def test_a_cancellation_from_outside_is_not_taken_for_a_hang_up(models) -> None:
    """The server cancelling a handler (shutting down) still cancels it; only the watcher's
    own cancellation becomes None."""
    async with aioti.load(models["mid_mlp"], workers=1) as model:
        client = Client()
        with anyio.move_on_after(0) as scope:
            await infer.run_unless_disconnected(model, [torch.randn(256, 1024)], client.receive)
        assert scope.cancelled_caught
        with anyio.fail_after(10):
            while client.waiting:
                await anyio.sleep(0.001)
