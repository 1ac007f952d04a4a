"""Write a sharded (FSDP2 / expert-parallel) model as one standard HF checkpoint, never gathering the full model.

Every rank calls `save_sharded_pretrained(model, dir)`. The layout is transformers' own, so the files equal what a
single-process `save_pretrained` writes, byte for byte:

1. plan on the meta device: a state dict of empty tensors with the global shapes, tied weights removed, then
   `revert_weight_conversion` (stacked experts -> per-expert keys) and `split_torch_state_dict_into_shards`
   give the file -> disk keys map and the index metadata;
2. the family's key table maps each disk key back to a box of an in-memory tensor (expert e, gate or up rows);
3. ranks publish which box of each tensor they hold (one all_gather_object of small metadata);
4. file by file, rank 0 assembles each disk tensor from the owners' pieces (point-to-point send/recv, one piece
   at a time; replicated pieces come from the lowest rank holding them), writes the file and frees it.
Peak memory on rank 0: one output file's tensors (bounded by max_shard_size) plus one piece.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.checkpoint.key_tables import IDENTITY, KeyTable, key_table_for

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Box:
    """Where a disk tensor lives: memory tensor `name`, region offsets/sizes, and the dims squeezed away."""

    name: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    squeeze_dim0: bool


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _global_state(model) -> dict[str, torch.Tensor]:
    """name -> live tensor (DTensor or plain), minus the keys the model never saves."""
    state = dict(model.state_dict(keep_vars=True))
    for key in getattr(model, "_keys_to_ignore_on_save", None) or []:
        state.pop(key, None)
    return state


def plan_files(model, state: dict[str, torch.Tensor], table: KeyTable, max_shard_size, dtype: torch.dtype | None = None):
    """(file -> disk keys, disk key -> meta tensor, disk key -> Box, index) exactly as transformers lays them out
    for this state dict written in `dtype` (None: each tensor's own dtype).

    huggingface_hub keeps tensors that share a storage in one file and counts that storage once; after
    `revert_weight_conversion` many per-expert tensors are views of one tensor. Meta tensors keep exactly that view
    structure (`_base`, storage nbytes), but huggingface_hub gives them no storage id, so it is passed explicitly.
    """
    from huggingface_hub.serialization._base import split_state_dict_into_shards_factory
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    def out_dtype(t):
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    meta = {name: torch.empty(t.shape, dtype=out_dtype(t), device="meta") for name, t in state.items()}
    meta = remove_tied_weights_from_state_dict(meta, model)
    disk = revert_weight_conversion(model, meta)
    boxes = disk_boxes(state, set(meta), table)
    if set(boxes) != set(disk):
        extra, lacking = sorted(set(boxes) - set(disk))[:3], sorted(set(disk) - set(boxes))[:3]
        raise RuntimeError(f"key table {table.family} disagrees with transformers' layout: {extra} vs {lacking}")

    def root(t):
        return t._base if t._base is not None else t  # noqa: SLF001

    split = split_state_dict_into_shards_factory(
        disk, get_storage_size=lambda t: root(t).untyped_storage().nbytes(), get_storage_id=lambda t: id(root(t)),
        filename_pattern=SAFE_WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_size,
    )
    index = None
    if split.is_sharded:
        index = {"metadata": {"total_parameters": model.num_parameters(), **split.metadata},
                 "weight_map": split.tensor_to_filename}
    return split.filename_to_tensors, disk, boxes, index


def disk_boxes(state: dict[str, torch.Tensor], kept: set[str], table: KeyTable) -> dict[str, Box]:
    """disk key -> Box, from the key table (the same table the loader uses)."""
    boxes: dict[str, Box] = {}
    for name, tensor in state.items():
        if name not in kept:
            continue
        shape = tuple(tensor.shape)
        rule = table.stacked_rule(name)
        if rule is None:
            boxes[table.to_disk_name(name)] = Box(name, (0,) * len(shape), shape, False)
            continue
        for expert in range(shape[0]):
            keys = table.expert_disk_keys(name, expert)
            rows = shape[1] // len(keys)
            for part, key in enumerate(keys):
                offsets = (expert, part * rows) + (0,) * (len(shape) - 2)
                boxes[key] = Box(name, offsets, (1, rows, *shape[2:]), True)
    return boxes


def _local_boxes(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]] | None]:
    from trainer.parallel.shard_io import local_box

    out = {}
    for name, tensor in state.items():
        local, offsets, sizes = local_box(tensor)
        out[name] = (offsets, sizes) if local.numel() else None
    return out


def _intersect(a_off, a_size, b_off, b_size):
    lo = [max(a, b) for a, b in zip(a_off, b_off)]
    hi = [min(a + s, b + t) for a, s, b, t in zip(a_off, a_size, b_off, b_size)]
    if any(l >= h for l, h in zip(lo, hi)):
        return None
    return tuple(lo), tuple(h - l for l, h in zip(lo, hi))


def _sl(offsets, sizes, origin):
    return tuple(slice(o - g, o - g + s) for o, s, g in zip(offsets, sizes, origin))


@torch.no_grad()
def save_sharded_pretrained(model, save_directory: str, max_shard_size="50GB", dtype: torch.dtype | None = None,
                            table: KeyTable | None = None) -> None:
    """Collective: write config, generation config, safetensors files and index to `save_directory` (rank 0)."""
    from safetensors.torch import save_file

    rank = _rank()
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    adapter = getattr(model, "moe_adapter", None)
    table = table or (adapter.key_table if adapter is not None else None) or key_table_for(model.config.model_type) or IDENTITY
    state = _global_state(model)
    files, disk_meta, boxes, index = plan_files(model, state, table, max_shard_size, dtype)

    mine = _local_boxes(state)
    everyone = [None] * dist.get_world_size() if distributed else [mine]
    if distributed:
        dist.all_gather_object(everyone, mine)

    if rank == 0:
        os.makedirs(save_directory, exist_ok=True)
        _save_configs(model, save_directory)
    for filename, keys in files.items():
        tensors = {}
        for key in keys:
            box = boxes[key]
            full = _assemble(state[box.name], box, everyone, rank, disk_meta[key].dtype)
            if rank == 0:
                tensors[key] = (full.squeeze(0) if box.squeeze_dim0 else full).contiguous()
        if rank == 0:
            save_file(tensors, os.path.join(save_directory, filename), metadata={"format": "pt"})
        del tensors
    if rank == 0 and index is not None:
        with open(os.path.join(save_directory, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if distributed:
        dist.barrier()


def _assemble(tensor, box: Box, everyone, rank: int, out_dtype: torch.dtype) -> torch.Tensor | None:
    """Rank 0 gets the box of `tensor` as a CPU tensor; other ranks send the pieces they own (None returned)."""
    from trainer.parallel.shard_io import local_box

    local, my_offsets, _ = local_box(tensor)
    out = torch.empty(box.sizes, dtype=out_dtype) if rank == 0 else None
    covered: set[tuple] = set()
    for owner, holdings in enumerate(everyone):
        held = holdings.get(box.name)
        if held is None:
            continue
        piece = _intersect(held[0], held[1], box.offsets, box.sizes)
        if piece is None or (piece in covered):
            continue  # replicated copies: the lowest rank holding a piece sends it
        covered.add(piece)
        offsets, sizes = piece
        if owner == rank:
            data = local[_sl(offsets, sizes, my_offsets)].to(out_dtype).contiguous()
            if rank == 0:
                out[_sl(offsets, sizes, box.offsets)].copy_(data)
            else:
                dist.send(data, dst=0)
        elif rank == 0:
            buffer = torch.empty(sizes, dtype=out_dtype, device=local.device)
            dist.recv(buffer, src=owner)
            out[_sl(offsets, sizes, box.offsets)].copy_(buffer)
    return out


def _save_configs(model, save_directory: str) -> None:
    """config.json and generation_config.json as `save_pretrained` writes them."""
    config = model.config
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    config.save_pretrained(save_directory)
    if model.can_generate():
        model.generation_config.save_pretrained(save_directory)
