"""`load_parallel`: build a HF model sharded over the job's mesh, each rank reading only its own weights.

    meta-device model (no memory) -> family patch -> EP + FSDP2 on meta -> to_empty (each rank allocates its shards)
    -> non-persistent buffers recomputed (rotary inv_freq) -> each rank reads its boxes from the safetensors files

Memory per rank: its shards of every weight plus one piece in flight; the full model never exists anywhere.
`model.save_pretrained(dir)` called on every rank writes one standard HF checkpoint (`trainer.checkpoint.hf_export`).
"""

from __future__ import annotations

import os
import types

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from trainer.checkpoint.key_tables import IDENTITY, key_table_for
from trainer.errors import UserError
from trainer.parallel import parallelize
from trainer.parallel.config import ParallelConfig
from trainer.parallel.shard_io import load_local_shards


def init_distributed() -> torch.device:
    """Join the torchrun job (NCCL on GPUs, gloo on CPU) if not done yet; returns this rank's device."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def resolve_checkpoint_dir(name_or_path: str, hf_kwargs: dict) -> str:
    """A local directory: as is; a hub id: downloaded by rank 0 (safetensors + json), then read by all ranks."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    kwargs = {k: hf_kwargs[k] for k in ("revision", "token", "cache_dir") if k in hf_kwargs}
    patterns = ["*.safetensors", "*.json"]
    if dist.get_rank() == 0:
        path = snapshot_download(name_or_path, allow_patterns=patterns, **kwargs)
    dist.barrier()
    if dist.get_rank() != 0:
        path = snapshot_download(name_or_path, allow_patterns=patterns, local_files_only=True, **kwargs)
    return path


def _master_dtype(hf_kwargs: dict) -> torch.dtype:
    """The dtype of the sharded master weights: `dtype=` if it names one, else float32."""
    dtype = hf_kwargs.get("dtype", hf_kwargs.get("torch_dtype"))
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        return getattr(torch, dtype)
    return torch.float32


@torch.no_grad()
def _recompute_non_persistent_buffers(model: torch.nn.Module) -> None:
    """to_empty leaves non-persistent buffers (rotary inv_freq) as garbage: let HF's own init recompute them."""
    for module in model.modules():
        if getattr(module, "_non_persistent_buffers_set", None):
            model._init_weights(module)  # noqa: SLF001 (transformers' per-module initialiser)


def load_parallel(name_or_path: str, config, adapter, parallel, **hf_kwargs):
    """Sharded `from_pretrained` for torchrun jobs. parallel: a ParallelConfig (or the recipe's section)."""
    device = init_distributed()
    config = hf_kwargs.get("config") or config  # a caller's edited config (recipe overrides) wins
    directory = resolve_checkpoint_dir(name_or_path, hf_kwargs)
    dtype = _master_dtype(hf_kwargs)
    if not isinstance(parallel, ParallelConfig):
        precision = "bf16-mixed" if device.type == "cuda" and dtype == torch.float32 else "fp32"
        parallel = ParallelConfig.from_any(parallel, precision)
    table = adapter.key_table if adapter is not None else (key_table_for(config.model_type) or IDENTITY)
    if table is None:
        raise UserError(
            f"{config.model_type} has no checkpoint key table, so it cannot be loaded shard by shard",
            "run with one process, or add a key table for the family in trainer/checkpoint/key_tables.py",
        )
    build_kwargs = {"dtype": dtype}
    if "attn_implementation" in hf_kwargs:
        build_kwargs["attn_implementation"] = hf_kwargs["attn_implementation"]
    with torch.device("meta"):
        if adapter is not None:
            from trainer.moe.experts import register_fast_experts

            model = AutoModelForCausalLM.from_config(config, experts_implementation=register_fast_experts(), **build_kwargs)
            adapter.patch(model)
            model.moe_adapter = adapter
        else:
            model = AutoModelForCausalLM.from_config(config, **build_kwargs)
    parallelize(model, parallel)
    model.to_empty(device=device)
    _recompute_non_persistent_buffers(model)
    tied = frozenset(_tied_names(model))
    load_local_shards(model, directory, table, tied_names=tied)
    install_sharded_save(model)
    return model.eval()


def _tied_names(model) -> list[str]:
    """Names that share storage with an earlier name in the state dict (e.g. lm_head.weight with tied embeddings)."""
    first: dict[int, str] = {}
    tied = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            tied.append(name)
        else:
            first[id(tensor)] = name
    return tied


def install_sharded_save(model) -> None:
    """Make `model.save_pretrained(dir, ...)` (called on every rank) write one standard HF checkpoint."""
    from trainer.checkpoint.hf_export import save_sharded_pretrained

    def save_pretrained(self, save_directory, max_shard_size="50GB", **_ignored):
        return save_sharded_pretrained(self, save_directory, max_shard_size=max_shard_size)

    model.save_pretrained = types.MethodType(save_pretrained, model)
