"""Reading weight files: `.safetensors` (optional dependency) or a `torch.save`d state_dict;
and the weights a package stores as `torch.save`d tensors (`package_constants_on_disk_format=
"pickle_weights"`)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..errors import InputError, ModelLoadError

__all__ = ["read_package_weights", "read_state_dict"]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, by key. Raises `InputError` naming the file on failure."""
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise InputError(f"weights file {str(path)!r} {what}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise InputError(
                "reading .safetensors needs the optional dependency: pip install 'aioti[safetensors]'"
            ) from exc
        try:
            return load_file(str(path))
        except Exception as exc:
            raise InputError(f"cannot read {str(path)!r} as safetensors: {exc}") from exc
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read {str(path)!r} as a torch.save'd state_dict: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InputError(f"{str(path)!r} does not hold a state_dict (a dict of tensors)")
    return data


def read_package_weights(config: Path) -> dict[str, torch.Tensor]:
    """The constants a package stores outside its library, by name: `weights_config.json` maps
    each to (file in `weights/` beside it, shape, stride, storage offset); a file holds one
    tensor, which several constants may view."""
    try:
        entries = json.loads(config.read_text())
        files: dict[str, torch.Tensor] = {}
        out = {}
        for name, (file, shape, stride, offset) in entries.items():
            if file not in files:
                files[file] = torch.load(config.parent / "weights" / file, map_location="cpu",
                                         weights_only=True)
            out[name] = files[file].as_strided(shape, stride, offset)
    except (OSError, ValueError, TypeError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ModelLoadError(f"cannot read the package's weights ({str(config)!r}): {exc}"
                             ) from exc
    return out
