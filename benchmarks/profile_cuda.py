"""Profile the event-loop thread of aioti on CUDA (mid MLP, batch 1, 4 streams, c64)."""

import cProfile
import pstats
import sys

import anyio
import torch

import aioti
from aioti.cli import measure
from aioti.testing import compile_model

path = compile_model("mid_mlp", "cuda")
x = torch.randn(1, 1024, device="cuda")


async def go() -> None:
    async with aioti.load(path, device="cuda", workers=int(sys.argv[1])) as model:
        await model.run([x])
        prof = cProfile.Profile()
        prof.enable()
        row = await measure(model, [x], 64, 2.0)
        prof.disable()
        print(row)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


anyio.run(go)
