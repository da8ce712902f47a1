"""A line-protocol inference server on trio over one aioti model.

    python examples/trio_service.py MODEL.pt2 [--port 8001]

Each line a client sends is JSON, `{"inputs": [[...], ...]}`; each answer is one JSON line,
`{"outputs": ...}` or `{"error": ...}`. `{"stats": true}` answers the model's stats. Every
connection is served by its own task; all share the model, whose runs never block trio's loop.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import trio

import aioti


async def handle(model: aioti.AsyncModel, stream: trio.SocketStream) -> None:
    buf = b""
    async with stream:
        async for chunk in stream:
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                await stream.send_all(json.dumps(await answer(model, line)).encode() + b"\n")


async def answer(model: aioti.AsyncModel, line: bytes) -> dict[str, Any]:
    try:
        req = json.loads(line)
        if req.get("stats"):
            return {"stats": model.stats()}
        y = await model(torch.tensor(req["inputs"], dtype=torch.float32))
        return {"outputs": y.tolist()}
    except (ValueError, KeyError, TypeError, aioti.AiotiError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


async def serve(model_path: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED
                ) -> None:
    """Serve until cancelled; `task_status.started` gets the bound port."""
    async with aioti.load(model_path) as model:
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(lambda s: handle(model, s), listeners)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--port", type=int, default=8001)
    args = ap.parse_args()
    trio.run(serve, args.model, args.port)


if __name__ == "__main__":
    main()
