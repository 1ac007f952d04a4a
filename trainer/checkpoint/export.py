"""Write the trained model as a standard Hugging Face checkpoint directory (safetensors, config, tokenizer).

The directory is assembled under a temporary name and renamed at the end, so a failed export leaves nothing behind.
Sharded (FSDP2/EP) models are streamed to rank 0 one safetensors file at a time (`save_sharded_pretrained`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def check_export_target(out_dir: str | Path, overwrite: bool) -> None:
    """UserError if `out_dir` exists and is not empty (unless overwrite)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"export directory {out} is not empty", "choose another directory or pass --overwrite")


def export_hf(model, tokenizer, out_dir: str | Path, dtype: torch.dtype, overwrite: bool = False) -> Path:
    """model (+ tokenizer) -> `out_dir` with config.json, generation_config.json, *.safetensors, tokenizer files.

    Collective under torchrun: a sharded (FSDP2/EP) model is written by `save_sharded_pretrained`, which streams
    one safetensors file at a time to rank 0, so no rank ever holds the full model.
    """
    out = Path(out_dir)
    check_export_target(out, overwrite)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    is_main = not distributed or dist.get_rank() == 0
    tmp = out.with_name(f".tmp-{out.name}")
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        if distributed:
            from trainer.checkpoint.hf_export import save_sharded_pretrained

            dist.barrier()
            save_sharded_pretrained(model, str(tmp), dtype=dtype)
        else:
            # Cast copies, never the live model: its fp32 master weights must survive an export in bf16.
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
            model.save_pretrained(str(tmp), state_dict=state)
        if is_main:
            _set_config_dtype(tmp / "config.json", dtype)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    finally:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    if distributed:
        dist.barrier()
    return out


def _set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    """save_pretrained records the live model's dtype; record the dtype the weights were written in."""
    config = json.loads(config_path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
