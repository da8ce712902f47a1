"""Reference models compiled with AOTInductor once and cached, for tests, benchmarks and the demo.

Each model is a small `torch.nn.Module` with a fixed seed, so its eager module is an oracle for the
compiled package. `compile_model(name)` exports and compiles it on first use and returns the path
of a cached `.pt2`; the cache key covers the torch version, the device, the compile options and the
source of this module, so a change to any of them compiles afresh. Compiles write to a temporary
file and rename it into place, so concurrent test processes never see half a package.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.export import Dim

__all__ = ["MODELS", "ModelSpec", "cache_dir", "compile_model", "eager_model", "example_inputs"]


class SmallMLP(nn.Module):
    """`Linear(64,128)-ReLU-Linear(128,10)`: the benchmark's small model."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class MidMLP(nn.Module):
    """Four `Linear(1024)` layers with ReLU between: the benchmark's mid-size model."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
            nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MultiIO(nn.Module):
    """Several inputs (one keyword-only) and a dict output holding a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, *, scale: torch.Tensor
    ) -> dict[str, Any]:
        h = self.proj(x) * scale
        return {"sum": h + y, "pair": (h.relu(), (y * 2).to(torch.float64))}


class Folding(nn.Module):
    """A constant sub-expression (`relu(w) + 1`) that runtime constant folding precomputes."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 32))
        self.b = nn.Parameter(torch.randn(32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (torch.relu(self.w) + 1.0).t() + self.b


class WithBuffers(nn.Module):
    """Parameters and buffers both; the buffer scales every output column."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.register_buffer("scale", torch.rand(16) + 0.5)
        self.register_buffer("shift", torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale: torch.Tensor = self.scale  # type: ignore[assignment]
        shift: torch.Tensor = self.shift  # type: ignore[assignment]
        return torch.tanh(self.fc(x)) * scale + shift


class Second(nn.Module):
    """The second model of the two-model package."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x))


class RowMixing(nn.Module):
    """Each row's output depends on the whole batch (its mean): batching must refuse it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x - x.mean(0, keepdim=True))


@dataclass(frozen=True)
class ModelSpec:
    """How to build, export and compile one reference model."""

    factory: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[tuple[Any, ...], dict[str, Any]]]
    dynamic: Callable[[], Any] = lambda: None
    configs: dict[str, Any] = field(default_factory=dict)
    # For multi-model packages: extra (model_name -> model key) entries packed beside this one.
    companions: tuple[str, ...] = ()


def _batch(max_: int = 1024) -> Dim:
    return Dim("batch", min=1, max=max_)


MODELS: dict[str, ModelSpec] = {
    "small_mlp": ModelSpec(
        SmallMLP, lambda b: ((torch.randn(b, 64),), {}), lambda: {"x": {0: _batch()}}
    ),
    "mid_mlp": ModelSpec(
        MidMLP, lambda b: ((torch.randn(b, 1024),), {}), lambda: {"x": {0: _batch(256)}}
    ),
    "multi_io": ModelSpec(
        MultiIO,
        lambda b: ((torch.randn(b, 16), torch.randn(b, 8)), {"scale": torch.rand(8) + 0.5}),
        lambda: {"x": {0: _batch(64)}, "y": {0: _batch(64)}, "scale": None},
    ),
    "folding": ModelSpec(
        Folding,
        lambda b: ((torch.randn(b, 32),), {}),
        lambda: {"x": {0: _batch(128)}},
        {"aot_inductor.use_runtime_constant_folding": True},
    ),
    "buffers": ModelSpec(WithBuffers, lambda b: ((torch.randn(b, 16),), {})),
    "static_mlp": ModelSpec(SmallMLP, lambda b: ((torch.randn(4, 64),), {})),
    "second": ModelSpec(Second, lambda b: ((torch.randn(b, 8),), {}), lambda: {"x": {0: _batch(32)}}),
    "row_mixing": ModelSpec(RowMixing, lambda b: ((torch.randn(b, 8),), {}),
                            lambda: {"x": {0: _batch(32)}}),
    "two_models": ModelSpec(SmallMLP, lambda b: ((torch.randn(b, 64),), {}),
                            lambda: {"x": {0: _batch()}}, companions=("second",)),
    "blob": ModelSpec(
        WithBuffers,
        lambda b: ((torch.randn(b, 16),), {}),
        configs={
            "aot_inductor.package_constants_in_so": False,
            "aot_inductor.package_constants_on_disk_format": "binary_blob",
        },
    ),
}


def eager_model(name: str, device: str = "cpu") -> nn.Module:
    """The seeded eager module of `name`: the same weights every call, on `device`."""
    torch.manual_seed(0)
    return MODELS[name].factory().eval().to(device)


def example_inputs(
    name: str, batch: int = 8, device: str = "cpu", seed: int = 1
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Seeded `(args, kwargs)` that fit model `name`."""
    torch.manual_seed(seed)
    args, kwargs = MODELS[name].inputs(batch)
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


def cache_dir() -> Path:
    """Where compiled reference models live: `$AIOTI_MODEL_CACHE` or `~/.cache/aioti/models`."""
    env = os.environ.get("AIOTI_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "aioti" / "models"


def _key(name: str, device: str) -> str:
    spec = MODELS[name]
    parts = [torch.__version__, device, name, repr(sorted(spec.configs.items())),
             repr(spec.companions), inspect.getsource(sys.modules[__name__])]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _export(name: str, device: str) -> torch.export.ExportedProgram:
    args, kwargs = example_inputs(name, device=device)
    with torch.no_grad():
        return torch.export.export(
            eager_model(name, device), args, kwargs, dynamic_shapes=MODELS[name].dynamic()
        )


def compile_model(name: str, device: str = "cpu", *, verbose: bool = False) -> Path:
    """Path of the cached `.pt2` of reference model `name` for `device`, compiling it if needed."""
    spec = MODELS[name]
    path = cache_dir() / f"{name}-{device.replace(':', '')}-{_key(name, device)}.pt2"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if verbose:
        print(f"aioti: compiling model {name!r} for {device} (once; cached in {path.parent})",
              file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        if spec.companions:
            from torch._inductor.package import package_aoti

            files = {}
            for model_name, key in (("model", name), *((c, c) for c in spec.companions)):
                args, kwargs = example_inputs(key, device=device)
                opts = {**MODELS[key].configs, "aot_inductor.package": True}
                files[model_name] = torch._inductor.aot_compile(
                    _export(key, device).module(), args, kwargs, options=opts
                )
            package_aoti(tmp, files)  # type: ignore[arg-type]
        else:
            torch._inductor.aoti_compile_and_package(
                _export(name, device), package_path=tmp, inductor_configs=spec.configs
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
