"""Safe weight loading: safetensors, or ``torch.load(weights_only=True)``; nothing else."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import LilyDeployError


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file, with a one-line error for a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise LilyDeployError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise LilyDeployError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" in str(exc) or "pickle" in str(exc).lower():
            from .models import untrusted_pickle

            raise LilyDeployError(untrusted_pickle(f"weights file {path}", path)) from None
        raise LilyDeployError(f"{path}: not a readable weights file ({str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise LilyDeployError(f"{path}: holds {type(state).__name__}, not a state dict")
    return state


def check_safetensors(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor in a safetensors file, reading the data to catch truncation."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LilyDeployError(f"{path} does not exist")
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        size = path.stat().st_size
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
            # the header may be intact while the data is cut short: touch the last tensor
            if shapes:
                f.get_tensor(list(shapes)[-1])
        import json
        import struct

        with open(path, "rb") as raw:
            header_len = struct.unpack("<Q", raw.read(8))[0]
            header = json.loads(raw.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end > size:
            raise ValueError(f"file is {size} bytes, header promises {8 + header_len + end}")
    except Exception as exc:
        raise LilyDeployError(f"{path}: damaged or truncated safetensors file ({str(exc).splitlines()[0]})") from None
    return shapes
