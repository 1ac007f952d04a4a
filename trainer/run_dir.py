"""The run directory: decide between resuming and starting fresh, and never clobber another run by accident."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from trainer.checkpoint.dcp import (
    checkpoints_dir,
    latest_checkpoint,
    read_meta,
    remove_stale_temporaries,
    verify_checkpoint,
)
from trainer.config import Recipe
from trainer.errors import UserError
from trainer.redact import redact_tree

MODEL_FILES = "hf"  # config, generation config and tokenizer of the run: what `moe export` rebuilds the model from
RUN_OUTPUTS = ("checkpoints", "export", "metrics.jsonl", "tensorboard", "loss.png", "expert_load.png", "recipe.yaml",
               MODEL_FILES)


def resolve_resume(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start; writes nothing.

    checkpoint.resume=auto continues from the newest checkpoint in output.dir; `never` starts fresh, which is only
    allowed in a directory without another run's checkpoints or export unless output.overwrite=true; a path
    resumes from that checkpoint, which must be complete and of the same model.
    """
    run = Path(recipe.output.dir)
    resume = recipe.checkpoint.resume
    latest = latest_checkpoint(run)
    occupied = latest is not None or _non_empty(run / "export")
    if resume == "auto" and latest is not None:
        _check_resumable(latest, recipe)
        return latest
    if resume not in ("auto", "never"):
        checkpoint = Path(resume)
        read_meta(checkpoint)  # UserError unless it is a checkpoint
        own = checkpoints_dir(run).resolve() in checkpoint.resolve().parents
        if occupied and not own and not recipe.output.overwrite:
            raise _occupied_error(run, latest)
        _check_resumable(checkpoint, recipe)
        return checkpoint
    if occupied and not recipe.output.overwrite:
        raise _occupied_error(run, latest)
    return None


def create_run_dir(recipe: Recipe, fresh: bool, is_main: bool = True) -> Path:
    """Create output.dir (cleared first for a fresh start with output.overwrite) and record the recipe in it."""
    run = Path(recipe.output.dir)
    if is_main:
        if fresh and recipe.output.overwrite:
            _clear(run)
        run.mkdir(parents=True, exist_ok=True)
        (run / "recipe.yaml").write_text(yaml.safe_dump(saved_recipe(recipe), sort_keys=False))
    remove_stale_temporaries(run)
    return run


def saved_recipe(recipe: Recipe) -> dict:
    """The recipe as written to recipe.yaml and into every checkpoint: credentials redacted."""
    return redact_tree(recipe.to_dict())


def _occupied_error(run: Path, latest: Path | None) -> UserError:
    held = f"checkpoints up to {latest.name}" if latest is not None else "an export"
    return UserError(
        f"output.dir {run} already holds another run ({held})",
        "resume it with checkpoint.resume=auto, start over with output.overwrite=true, or pick another output.dir",
    )


def _check_resumable(checkpoint: Path, recipe: Recipe) -> None:
    verify_checkpoint(checkpoint)
    _check_same_model(checkpoint, recipe)


def _check_same_model(checkpoint: Path, recipe: Recipe) -> None:
    saved = read_meta(checkpoint).get("recipe", {}).get("model", {})
    for key in ("name_or_path", "config_overrides"):
        if key in saved and saved[key] != redact_tree(getattr(recipe.model, key)):  # saved values are redacted
            raise UserError(
                f"checkpoint {checkpoint} was trained with model.{key}={saved[key]!r}, "
                f"not {getattr(recipe.model, key)!r}",
                "use the same model, or start fresh with checkpoint.resume=never output.overwrite=true",
            )


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _clear(run: Path) -> None:
    for name in RUN_OUTPUTS:
        target = run / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def save_model_files(run_dir: Path, model, tokenizer) -> Path:
    """Write the model's config, generation config and tokenizer to <run_dir>/hf (no weights: those are in DCP)."""
    target = Path(run_dir) / MODEL_FILES
    target.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(target))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target
