"""Read Hugging Face safetensors checkpoints straight into (possibly sharded) HF v5 modules.

`load_into(model, checkpoint_dir, table)` fills every parameter and persistent buffer of an already-built model
(on CPU, GPU, or materialised from the meta device) from a single-file or index-sharded safetensors checkpoint.
Stacked expert tensors are filled one expert slice at a time with `safe_open(...).get_slice`, so no second full copy
is ever made; `expert_range` restricts which experts this rank reads (expert parallelism).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack

import torch
from safetensors import safe_open

from trainer.checkpoint.key_tables import KeyTable
from trainer.checkpoint.model_files import SAFE_INDEX as SAFE_WEIGHTS_INDEX_NAME
from trainer.checkpoint.model_files import check_weight_files
from trainer.errors import UserError


def checkpoint_weight_map(checkpoint_dir: str) -> dict[str, str]:
    """disk key -> absolute shard path, from the index (sharded) or the single file. The files are checked first
    (`trainer.checkpoint.model_files`): shards present, headers readable, nothing truncated."""
    files = check_weight_files(checkpoint_dir)
    index_path = os.path.join(checkpoint_dir, SAFE_WEIGHTS_INDEX_NAME)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {key: os.path.join(checkpoint_dir, name) for key, name in weight_map.items()}
    with safe_open(str(files[0]), framework="pt") as f:
        return {key: str(files[0]) for key in f.keys()}


def _tensors_to_fill(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers by name, tied parameters once."""
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield name, tensor


def _local_view(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)
    return (to_local() if to_local is not None else tensor).data


def _check_shape(key: str, expected: tuple[int, ...], found: list[int]) -> None:
    if tuple(found) != tuple(expected):
        raise UserError(
            f"checkpoint tensor {key} has shape {tuple(found)} but the model expects {tuple(expected)}",
            "check that the config.json matches the weights (or that the model preset is the right one)",
        )


@torch.no_grad()
def load_into(
    model: torch.nn.Module,
    checkpoint_dir: str,
    table: KeyTable,
    *,
    expert_range: tuple[int, int] | None = None,
    tied_names: frozenset[str] = frozenset(),
) -> None:
    """Copy a HF safetensors checkpoint into `model`'s existing tensors.

    expert_range: (first, end) global expert ids held by this rank in dim 0 of stacked expert tensors
        (default: all). Stacked tensors' local dim 0 must equal end - first.
    tied_names: memory names allowed to be absent on disk because they are tied to another tensor.
    """
    weight_map = checkpoint_weight_map(checkpoint_dir)
    with ExitStack() as stack:
        handles: dict[str, object] = {}

        def read(key: str):
            path = weight_map.get(key)
            if path is None:
                return None
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt"))
            return handles[path].get_slice(key)

        missing: list[str] = []
        for name, tensor in _tensors_to_fill(model):
            target = _local_view(tensor)
            rule = table.stacked_rule(name)
            if rule is None:
                key = table.to_disk_name(name)
                source = read(key)
                if source is None:
                    if name not in tied_names:
                        missing.append(key)
                    continue
                _check_shape(key, tuple(target.shape), source.get_shape())
                target.copy_(source[:])
                continue
            first, end = expert_range if expert_range is not None else (0, target.shape[0])
            for local, expert in enumerate(range(first, end)):
                keys = table.expert_disk_keys(name, expert)
                rows = target.shape[1] // len(keys)  # fused tensors concatenate equal parts (gate | up)
                for part, key in enumerate(keys):
                    source = read(key)
                    if source is None:
                        missing.append(key)
                        continue
                    _check_shape(key, (rows, *target.shape[2:]), source.get_shape())
                    target[local, part * rows : (part + 1) * rows].copy_(source[:])
        if missing:
            shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
            raise UserError(
                f"checkpoint {checkpoint_dir} lacks {len(missing)} tensor(s) the model needs: {shown}",
                "check that the checkpoint matches the model family and config, or that no shard is truncated",
            )
