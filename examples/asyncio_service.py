"""An HTTP inference service on asyncio (Starlette + uvicorn) over one aioti model.

    python examples/asyncio_service.py MODEL.pt2 [--port 8000] [--batching 64 [--on-loop]]

Endpoints:
- POST /predict   {"inputs": [[...], ...]}  -> {"outputs": [[...], ...]}   (one flat input)
- POST /hot-swap  {"state_dict": PATH}      -> {"swapped": true}         (weights file on disk)
- POST /rollback                            -> {"rolled_back": true}
- GET  /stats                               -> the model's counters and latency percentiles
- GET  /healthz                             -> 200 while the model serves, else 503 and why

The model is loaded at start-up and closed at shutdown (Starlette's lifespan); requests await
the model concurrently and never block the loop. `--batching N` merges concurrent requests into
runs of up to N rows; with `--on-loop` those runs happen on the loop's own thread (for a fast
CPU model: no thread hand-offs, the loop busy for each batched run). Bad input answers 422 with
the model's message; a full queue, or a model that no longer serves (`ClosedError`: closing, or
its worker failed), 503.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import aioti


def create_app(model_path: str, **load_kwargs: Any) -> Starlette:
    state: dict[str, aioti.AsyncModel] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with aioti.load(model_path, on_full="raise", **load_kwargs) as model:
            state["model"] = model
            yield

    async def predict(request: Request) -> JSONResponse:
        try:
            body = await request.json()  # not JSON: a ValueError
            x = torch.tensor(body["inputs"], dtype=torch.float32)
            y = await state["model"](x)
        except (KeyError, TypeError, ValueError) as exc:
            return JSONResponse({"error": f"bad request: {exc}"}, status_code=422)
        except (aioti.QueueFullError, aioti.ClosedError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=503)
        return JSONResponse({"outputs": y.tolist()})

    async def hot_swap(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            await state["model"].hot_swap(body["state_dict"])
        except (KeyError, TypeError, ValueError) as exc:  # aioti.InputError is a ValueError
            return JSONResponse({"error": str(exc)}, status_code=422)
        return JSONResponse({"swapped": True})

    async def rollback(request: Request) -> JSONResponse:
        await state["model"].swap_constants()
        return JSONResponse({"rolled_back": True})

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(state["model"].stats())

    async def healthz(request: Request) -> JSONResponse:  # a readiness probe
        stats = state["model"].stats()
        return JSONResponse({"healthy": stats["healthy"], "fault": stats["fault"]},
                            status_code=200 if stats["healthy"] else 503)

    return Starlette(
        routes=[Route("/predict", predict, methods=["POST"]),
                Route("/hot-swap", hot_swap, methods=["POST"]),
                Route("/rollback", rollback, methods=["POST"]),
                Route("/stats", stats), Route("/healthz", healthz)],
        lifespan=lifespan,
    )


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--batching", type=int, metavar="MAX_ROWS", help="merge concurrent requests")
    ap.add_argument("--on-loop", action="store_true", help="run batches on the loop's thread")
    args = ap.parse_args()
    kw: dict[str, Any] = {}
    if args.batching:
        kw["batching"] = aioti.Batching(max_batch_size=args.batching, on_loop=args.on_loop)
    uvicorn.run(create_app(args.model, **kw), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
