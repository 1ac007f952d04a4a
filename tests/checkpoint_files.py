"""Checkpoint directories for the round-trip and export tests: their tensors, their bytes, and the single-process
exports the distributed exports are compared with."""

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


def file_bytes(directory) -> dict[str, bytes]:
    """Every file of `directory` by name, as bytes (for bit-for-bit comparisons of two exports)."""
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def save_single_process_exports(hf_config, directory) -> None:
    """A random HF model saved in 20 KB shards to `directory`/original, loaded by this project in one process and
    saved again as `directory`/single (same sharding) and `directory`/single_file."""
    import copy

    from transformers import AutoModelForCausalLM

    from trainer.models import MoEAutoModelForCausalLM

    torch.manual_seed(0)
    hf_model = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config))
    hf_model.save_pretrained(os.path.join(directory, "original"), max_shard_size="20KB")
    single = MoEAutoModelForCausalLM.from_pretrained(os.path.join(directory, "original"))
    single.save_pretrained(os.path.join(directory, "single"), max_shard_size="20KB")
    single.save_pretrained(os.path.join(directory, "single_file"))
