"""Hot-swap weights while a model serves, then roll back.

    python examples/hot_swap.py

Sixteen tasks keep calling the model while the main task swaps in new weights and rolls them
back: every answer comes from exactly one weight set, none fails, and the loop never blocks.
"""

from __future__ import annotations

import anyio
import torch

import aioti
from aioti.testing import compile_model, eager_model


async def main(path: str | None = None) -> dict[str, int]:
    path = path or str(compile_model("small_mlp"))
    old = eager_model("small_mlp")
    new = eager_model("small_mlp")
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.1)
    x = torch.randn(4, 64)
    want = {"old": old(x), "new": new(x)}
    seen = {"old": 0, "new": 0}
    async with aioti.load(path) as model:
        done = False

        async def client() -> None:
            while not done:
                y = await model(x)
                for name, ref in want.items():
                    if torch.allclose(y, ref, atol=1e-5):
                        seen[name] += 1

        async with anyio.create_task_group() as tg:
            for _ in range(16):
                tg.start_soon(client)
            await anyio.sleep(0.05)
            await model.hot_swap(new.state_dict())  # update inactive -> (fold) -> swap
            await anyio.sleep(0.05)
            await model.swap_constants()  # roll back: the old weights were kept inactive
            await anyio.sleep(0.05)
            done = True
        print(f"answers from the old weights: {seen['old']}, from the new: {seen['new']}; "
              f"{model.stats()['failed']} failed")
    return seen


if __name__ == "__main__":
    anyio.run(main)
