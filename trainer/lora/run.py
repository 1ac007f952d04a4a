"""A LoRA run's model around the training loop: build (base, then adapters), keep the base, export both forms.

- The base weights come from `model.name_or_path`. A random-init base (`model.from_config: true`) cannot be
  rebuilt from anything, so a fresh run writes it once to the run's `hf/` directory (beside its config and
  tokenizer); a resume and `moe export` read it from there. It is the frozen base, written as it was built, and
  synced to disk before training starts: every checkpoint of the run depends on it, and a 57 GiB base left to the
  page cache would be written back during the first measured steps.
- Checkpoints hold the trainable state only (`trainer.checkpoint.dcp`).
- The export is two directories: `<export>-adapter/` (PEFT's format) and `<export>/` (the merged plain model).
Under FSDP2 the saved base and both exports are the all-gathered full tensors, written by rank 0
(`trainer.lora.gather`); every rank calls `save_base` and `export_lora`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from trainer.lora.export import adapter_dir_for, base_state_dict, merged_state_dict, save_adapter
from trainer.lora.gather import gathered_state, is_distributed, is_writer
from trainer.lora.inject import apply_lora

BASE_WEIGHTS = "lora-base.safetensors"  # the model's own names and layout (not an HF checkpoint's per-expert keys)


def base_model_name(model_cfg) -> str | None:
    """What adapter_config.json names as the base: the hub id or directory, None for a random-init base."""
    return None if model_cfg.from_config else model_cfg.name_or_path


def has_saved_base(model_files: Path) -> bool:
    return (Path(model_files) / BASE_WEIGHTS).is_file()


def save_base(model: torch.nn.Module, model_files: Path) -> None:
    """Write the frozen base (plain names, no adapters) into the run's model files; a tensor tied to another one
    (shared storage) is written once. Collective under several processes (rank 0 writes)."""
    from safetensors.torch import save_file

    full = gathered_state(model)
    if not is_writer():
        return
    state, seen = {}, set()
    for name, tensor in base_state_dict(model, full).items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().contiguous()
    path = Path(model_files) / BASE_WEIGHTS
    save_file(state, str(path), metadata={"format": "pt"})
    with open(path, "rb") as f:  # on disk before training starts, as DCP syncs its checkpoint files
        os.fsync(f.fileno())


def load_saved_base(model: torch.nn.Module, model_files: Path) -> None:
    """Put the saved base weights into a freshly built model (before `apply_lora`): same names, same shapes."""
    from safetensors.torch import load_file

    state = load_file(str(Path(model_files) / BASE_WEIGHTS), device=str(next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    live = model.state_dict()
    loaded = {live[k].data_ptr() for k in state if k in live}
    missing = [k for k in missing if live[k].data_ptr() not in loaded]  # tied to a loaded tensor: it is loaded too
    if missing or unexpected:
        raise RuntimeError(f"saved base weights in {model_files} do not fit the model: {(missing + unexpected)[:3]}")


def adapted(model: torch.nn.Module, lora_cfg, model_files: Path | None = None) -> torch.nn.Module:
    """The built base model (base weights from `model_files` when it holds them) with the recipe's adapters."""
    if model_files is not None and has_saved_base(model_files):
        load_saved_base(model, model_files)
    return apply_lora(model, lora_cfg)


def export_lora(model: torch.nn.Module, tokenizer, out_dir: Path, dtype: torch.dtype, overwrite: bool = False,
                keep: tuple[Path, ...] = (), base_model: str | None = None) -> Path:
    """`<out_dir>-adapter/` (PEFT) and `<out_dir>/` (base + adapter merged, plain HF). Returns out_dir.
    Collective under several processes: the full tensors are gathered to rank 0, which writes both."""
    import torch.distributed as dist

    from trainer.checkpoint.export import check_export_target, export_hf
    from trainer.lora.export import check_adapter_target

    check_export_target(out_dir, overwrite, keep)  # both refused before either is written
    check_adapter_target(adapter_dir_for(out_dir), overwrite)
    full = gathered_state(model)
    merged = {}
    if is_writer():
        save_adapter(model, adapter_dir_for(out_dir), dtype, overwrite=overwrite, base_model=base_model, state=full)
        merged = merged_state_dict(model, full)
    if is_distributed():
        dist.barrier()
    return export_hf(model, tokenizer, out_dir, dtype, overwrite=overwrite, keep=keep, state=merged)
