"""Reading weight files: `.safetensors` (optional dependency) or a `torch.save`d state_dict."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError

__all__ = ["read_state_dict"]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, by key. Raises `InputError` naming the file on failure."""
    if not path.is_file():
        raise InputError(f"weights file {str(path)!r} does not exist")
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
