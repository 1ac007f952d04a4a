"""Reading every tensor of a safetensors checkpoint directory, for the round-trip tests."""

from __future__ import annotations

import os

import torch
from safetensors import safe_open


def read_all_tensors(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in `directory`, by key."""
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors
