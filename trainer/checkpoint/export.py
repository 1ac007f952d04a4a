"""Write the trained model as a standard Hugging Face checkpoint directory (safetensors, config, tokenizer).

The directory is assembled under a temporary name next to the target and swapped into place at the end
(`trainer.checkpoint.durable.replace_dir`), so a failed or killed export leaves the previous export as it was.
Sharded (FSDP2/EP) models are streamed to rank 0 one safetensors file at a time (`save_sharded_pretrained`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from trainer.checkpoint.durable import recover_dir, replace_dir
from trainer.errors import UserError
from trainer.faults import fault_flag
from trainer.quiet import quiet_transformers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
EXPORT_MARKER = "config.json"  # every Hugging Face export has one; a directory without it is not an export


def check_export_target(out_dir: str | Path, overwrite: bool, keep: tuple[Path, ...] = ()) -> None:
    """UserError unless `out_dir` may receive an export; writes nothing.

    Refused: a directory that is, contains or lies inside one of `keep` (the run's checkpoints and model files:
    replacing it would delete what is being exported); a non-empty directory without `overwrite`; and, even with
    `overwrite`, a non-empty directory that is not an earlier export (no config.json), which holds someone's files.
    """
    out = Path(out_dir)
    resolved = out.resolve()
    for path in keep:
        kept = Path(path).resolve()
        if resolved == kept or kept in resolved.parents or resolved in kept.parents:
            raise UserError(f"export directory {out} would replace {path}, which the export is made from",
                            "export outside the run's checkpoints/ and hf/ (e.g. <output.dir>/export or another "
                            "directory)")
    check_replaceable(out, overwrite, EXPORT_MARKER, "export", "a Hugging Face export")


def check_replaceable(out: Path, overwrite: bool, marker: str, kind: str, what: str) -> None:
    """UserError unless `out` is new or empty, or (with `overwrite`) an earlier output of this kind: one holding
    `marker` (anything else is someone's files)."""
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise UserError(f"{kind} directory {out} is not empty", "choose another directory or pass --overwrite")
    if not (out / marker).is_file():
        raise UserError(f"{kind} directory {out} holds files that are not {what} (no {marker})",
                        "--overwrite only replaces an earlier export: choose an empty or new directory")


def export_hf(model, tokenizer, out_dir: str | Path, dtype: torch.dtype, overwrite: bool = False,
              keep: tuple[Path, ...] = (), state: dict | None = None) -> Path:
    """model (+ tokenizer) -> `out_dir` with config.json, generation_config.json, *.safetensors, tokenizer files.

    Collective under torchrun: a sharded (FSDP2/EP) model is written by `save_sharded_pretrained`, which streams
    one safetensors file at a time to rank 0, so no rank ever holds the full model. A full or read-only disk is a
    UserError; the previous export, if any, is untouched. `state`: full tensors to write instead of the model's
    own (a LoRA run's merged weights, `trainer.lora.export`); under several processes rank 0 writes them and the
    other ranks pass {} (nothing is streamed).
    """
    out = Path(out_dir)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    is_main = not distributed or dist.get_rank() == 0
    if is_main:
        recover_dir(out)  # an earlier export killed half-way through its swap
    check_export_target(out, overwrite, keep)
    tmp = out.with_name(f".tmp-{out.name}")
    try:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if distributed:
            dist.barrier()
        if distributed and state is None:
            from trainer.checkpoint.hf_export import save_sharded_pretrained

            save_sharded_pretrained(model, str(tmp), dtype=dtype)
        elif is_main:
            # Cast copies, never the live model: its fp32 master weights must survive an export in bf16.
            state = {k: v.to(dtype) if v.is_floating_point() else v
                     for k, v in (model.state_dict() if state is None else state).items()}
            with quiet_transformers():
                model.save_pretrained(str(tmp), state_dict=state)
        if is_main:
            _set_config_dtype(tmp / "config.json", dtype)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            fault_flag("MOE_FAULT_HANG_DURING_EXPORT", f"hanging before the export swap (new export in {tmp.name})")
            replace_dir(tmp, out)
    except (OSError, SafetensorError) as err:  # safetensors reports the OS's error (ENOSPC, EROFS) as its own type
        raise UserError(f"cannot write the export to {out} ({_os_reason(err)})",
                        "free some space or make the directory writable, then export from the run's checkpoints "
                        "with `moe export <output.dir> <directory>` (they are untouched)") from None
    finally:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    if distributed:
        dist.barrier()
    return out


def _os_reason(err: Exception) -> str:
    """The OS's words: "No space left on device", "Read-only file system", ..."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    text = re.sub(r"\s*\(os error \d+\)", "", str(err))
    return text.split("I/O error:", 1)[-1].strip()[:120] if "I/O error:" in text else (text[:120] or type(err).__name__)


def _set_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    """save_pretrained records the live model's dtype; record the dtype the weights were written in."""
    config = json.loads(config_path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
