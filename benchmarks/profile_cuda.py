"""Profile aioti on CUDA (mid MLP, batch 1, c64): run under py-spy to see where the loop goes.

    py-spy record -r 1000 -f raw -o prof.txt -- python benchmarks/profile_cuda.py WORKERS [SECONDS]
"""

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
        print(await measure(model, [x], 64, float(sys.argv[2]) if len(sys.argv) > 2 else 5.0))


anyio.run(go)
