"""Read each rank's own piece of every tensor straight from a HF safetensors checkpoint.

A sharded parameter (FSDP2 and/or EP DTensor) tells which box of the global tensor this rank holds
(`DTensor.__create_chunk_list__`, the same metadata DCP uses); only that box is read, with safetensors slicing.
For stacked experts the box is cut into per-expert (and gate/up part) pieces through the family's key table.
Peak extra memory: one piece being copied; nothing else is materialised.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from safetensors import safe_open

from trainer.checkpoint.hf_io import checkpoint_weight_map
from trainer.checkpoint.key_tables import KeyTable
from trainer.errors import UserError


def local_box(tensor: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor, offsets, sizes) of this rank's piece of a DTensor, or of the whole tensor."""
    chunks = getattr(tensor, "__create_chunk_list__", None)
    if chunks is None or not hasattr(tensor, "to_local"):
        return tensor.data, (0,) * tensor.dim(), tuple(tensor.shape)
    chunk = chunks()[0]
    return tensor.to_local().data, tuple(int(o) for o in chunk.offsets), tuple(int(s) for s in chunk.sizes)


def _slices(offsets, sizes) -> tuple[slice, ...]:
    return tuple(slice(o, o + s) for o, s in zip(offsets, sizes))


@torch.no_grad()
def load_local_shards(model: torch.nn.Module, checkpoint_dir: str, table: KeyTable,
                      tied_names: frozenset[str] = frozenset()) -> None:
    """Fill every parameter and persistent buffer of a (sharded, materialised) model with its rank-local piece."""
    weight_map = checkpoint_weight_map(checkpoint_dir)
    missing: list[str] = []
    seen: set[int] = set()
    with ExitStack() as stack:
        handles: dict[str, object] = {}

        def read(key: str):
            path = weight_map.get(key)
            if path is None:
                missing.append(key)
                return None
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt"))
            return handles[path].get_slice(key)

        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            local, offsets, sizes = local_box(tensor)
            if local.numel() == 0:
                continue
            rule = table.stacked_rule(name)
            if rule is None:
                key = table.to_disk_name(name)
                if key not in weight_map and name in tied_names:
                    continue
                source = read(key)
                if source is not None:
                    _check_shape(key, tuple(tensor.shape), source.get_shape())
                    local.copy_(source[_slices(offsets, sizes)])
                continue
            _load_stacked(name, tensor, local, offsets, sizes, table, read)
    if missing:
        shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
        raise UserError(
            f"checkpoint {checkpoint_dir} lacks {len(missing)} tensor(s) the model needs: {shown}",
            "check that the checkpoint matches the model family and config, or that no shard is truncated",
        )


def _load_stacked(name, tensor, local, offsets, sizes, table: KeyTable, read) -> None:
    """Box [e0:e1, r0:r1, ...] of a stacked [E, parts*rows, ...] tensor, read expert by expert and part by part."""
    e0, r0 = offsets[0], offsets[1]
    rest = _slices(offsets[2:], sizes[2:])
    for expert in range(e0, e0 + sizes[0]):
        keys = table.expert_disk_keys(name, expert)
        rows = tensor.shape[1] // len(keys)
        for part, key in enumerate(keys):
            lo, hi = max(r0, part * rows), min(r0 + sizes[1], (part + 1) * rows)
            if lo >= hi:
                continue
            source = read(key)
            if source is None:
                continue
            _check_shape(key, (rows, *tensor.shape[2:]), source.get_shape())
            piece = source[(slice(lo - part * rows, hi - part * rows), *rest)]
            local[expert - e0, lo - r0 : hi - r0].copy_(piece)


def _check_shape(key: str, expected: tuple[int, ...], found) -> None:
    if tuple(found) != tuple(expected):
        raise UserError(
            f"checkpoint tensor {key} has shape {tuple(found)} but the model expects {tuple(expected)}",
            "check that the config.json matches the weights (or that the model preset is the right one)",
        )
