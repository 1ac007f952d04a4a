"""Export any training checkpoint: rebuild the model from the run's saved config, load DCP weights, save as HF."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from trainer.checkpoint.dcp import latest_checkpoint, load_model_weights, read_meta
from trainer.checkpoint.export import DTYPES, export_hf
from trainer.errors import UserError

MODEL_FILES = "hf"  # same name as trainer.run_dir.MODEL_FILES (kept here so checkpoint/ does not import upward)


def find_checkpoint(source: Path) -> Path:
    """A run dir -> its latest checkpoint; a checkpoint dir -> itself."""
    if (source / "meta.json").is_file():
        return source
    latest = latest_checkpoint(source)
    if latest is None:
        raise UserError(f"{source} has no checkpoint", "pass a run directory (output.dir) or a checkpoints/step_* dir")
    return latest


def sources_of(checkpoint: Path) -> tuple[Path, Path]:
    """What an export of `checkpoint` is made from, so it must never replace them: the run's checkpoints/ and hf/."""
    run_dir = checkpoint.parent.parent
    return run_dir / "checkpoints", run_dir / MODEL_FILES


def export_checkpoint(source: Path, out_dir: Path, dtype: str = "auto", overwrite: bool = False) -> tuple[Path, int]:
    """Write `out_dir` as a HF checkpoint of `source` (run dir or checkpoint); returns (out_dir, step)."""
    from trainer.models import MoEAutoModelForCausalLM

    checkpoint = find_checkpoint(source)
    run_dir = checkpoint.parent.parent
    model_files = run_dir / MODEL_FILES
    if not (model_files / "config.json").is_file():
        raise UserError(f"{model_files} is missing (the run's config and tokenizer)", "export from a complete run dir")
    recipe = read_meta(checkpoint).get("recipe", {})
    if dtype == "auto":  # the trainer resolves output.export_dtype before it saves the recipe
        dtype = recipe.get("output", {}).get("export_dtype", "bfloat16")
    if dtype == "auto":
        dtype = "bfloat16"
    config = AutoConfig.from_pretrained(str(model_files))
    attn = recipe.get("model", {}).get("attn_implementation", "auto")
    attn = None if attn == "auto" else attn  # transformers' pick, as in training (trainer.build)
    lora = recipe.get("lora", {})
    if lora.get("enabled"):
        model = _lora_base(recipe, config, model_files, attn)
    else:
        model = MoEAutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    step = load_model_weights(checkpoint, model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_files))
    if lora.get("enabled"):
        from trainer.lora import run as lora_run

        lora_run.export_lora(model, tokenizer, out_dir, DTYPES[dtype], overwrite=overwrite, keep=sources_of(checkpoint),
                             base_model=lora_run.base_model_name(_model_config(recipe)))
    else:
        export_hf(model, tokenizer, out_dir, DTYPES[dtype], overwrite=overwrite, keep=sources_of(checkpoint))
    return out_dir, step


def _model_config(recipe: dict):
    from trainer.config import ModelConfig

    return ModelConfig(**recipe.get("model", {}))


def _lora_base(recipe: dict, config, model_files: Path, attn):
    """A LoRA run's model for export: its frozen base (saved in the run for a random-init base, else the recipe's
    model.name_or_path) with the run's adapters, whose trained values the checkpoint then provides."""
    from trainer.build import build_model
    from trainer.config import LoraConfig
    from trainer.lora import run as lora_run
    from trainer.models import MoEAutoModelForCausalLM

    lora = LoraConfig(**recipe["lora"])
    if lora_run.has_saved_base(model_files):
        model = MoEAutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
        return lora_run.adapted(model, lora, model_files)
    model = build_model(_model_config(recipe), torch.float32, torch.device("cpu"))
    return lora_run.adapted(model, lora)
