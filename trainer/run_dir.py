"""The run directory: decide between resuming and starting fresh, and never clobber another run (or a user's file).

Everything here that can refuse runs before the trainer's first write: `resolve_resume` locks an existing run
(`trainer.run_lock`), checks the checkpoint to resume (files and checksums, model, data, seq_len) and that no input
lies where the run writes; `create_run_dir` is the first write, and locks a new directory before it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from trainer.checkpoint.dcp import (
    checkpoints_dir,
    complete_checkpoints,
    latest_checkpoint,
    read_meta,
    remove_stale_temporaries,
    verify_checkpoint,
)
from trainer.config import Recipe
from trainer.errors import UserError
from trainer.redact import redact_tree
from trainer.run_inputs import check_inputs_survive, check_same_inputs, fingerprint
from trainer.run_lock import lock_run_dir

MODEL_FILES = "hf"  # config, generation config and tokenizer of the run: what `moe export` rebuilds the model from
RECIPE_FILE = "recipe.yaml"
RUN_OUTPUTS = ("checkpoints", "export", "metrics.jsonl", "tensorboard", "loss.png", "expert_load.png", RECIPE_FILE,
               MODEL_FILES, "best.json", "wandb")
# First line of the recipe.yaml the trainer writes: how it tells its own record from a user's file of that name.
RECIPE_HEADER = "# moe train: the resolved recipe of this run; `moe train <this file>` resumes it"


class RunRecord(dict):
    """The redacted recipe as a dict (what meta.json stores), carrying the run's input fingerprints in `inputs`."""

    inputs: dict = {}


def resolve_resume(recipe: Recipe) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start; writes nothing.

    checkpoint.resume=auto continues from the newest checkpoint in output.dir; `never` starts fresh, which is only
    allowed in a directory without another run's checkpoints or export unless output.overwrite=true; a path
    resumes from that checkpoint, which must be complete, intact and of the same model and data.
    """
    run = Path(recipe.output.dir)
    if _is_main():
        lock_run_dir(run, create=False)  # an existing run: no other trainer may change it while this one checks
    resume = recipe.checkpoint.resume
    starting_over = resume == "never" and recipe.output.overwrite
    latest = None if starting_over else latest_checkpoint(run)
    occupied = bool(complete_checkpoints(run)) or latest is not None or _non_empty(run / "export")
    checkpoint = None
    if resume == "auto" and latest is not None:
        checkpoint = latest
    elif resume not in ("auto", "never"):
        checkpoint = Path(resume)
        read_meta(checkpoint)  # UserError unless it is a checkpoint
        own = checkpoints_dir(run).resolve() in checkpoint.resolve().parents
        if occupied and not own and not recipe.output.overwrite:
            raise _occupied_error(run, latest)
    elif occupied and not recipe.output.overwrite:
        raise _occupied_error(run, latest)
    _check_user_files(recipe, run)
    if checkpoint is not None:
        verify_checkpoint(checkpoint)
        check_same_inputs(checkpoint, read_meta(checkpoint), recipe)
    return checkpoint


def create_run_dir(recipe: Recipe, fresh: bool, is_main: bool = True) -> Path:
    """Lock output.dir, clear it for a fresh start with output.overwrite, and record the recipe in it."""
    run = Path(recipe.output.dir)
    if is_main:
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create output.dir {run} ({err.strerror})",
                            "point output.dir at a writable directory") from None
        lock_run_dir(run, create=True)  # before the first write: a second trainer stops here, having written nothing
        if fresh and recipe.output.overwrite:
            _clear(run)
        text = RECIPE_HEADER + "\n" + yaml.safe_dump(dict(saved_recipe(recipe)), sort_keys=False)
        _replace_file(run / RECIPE_FILE, text)
    remove_stale_temporaries(run)
    return run


def saved_recipe(recipe: Recipe) -> RunRecord:
    """The recipe as written to recipe.yaml and into every checkpoint: credentials redacted, input fingerprints
    attached (meta.json stores them next to the recipe; recipe.yaml does not)."""
    record = RunRecord(redact_tree(recipe.to_dict()))
    record.inputs = fingerprint(recipe)
    return record


def _check_user_files(recipe: Recipe, run: Path) -> None:
    """No input may lie where the run writes, and output.dir's recipe.yaml may only be replaced if the trainer
    wrote it (a user's own recipe file of that name is refused, not overwritten)."""
    record = run / RECIPE_FILE
    own = not record.exists() or _is_own_record(record, run)
    if not own:
        raise UserError(f"{record} was not written by moe train (your own recipe file?) and a run records its "
                        f"recipe there", "move your file out of output.dir, or pick another output.dir")
    check_inputs_survive(recipe, run, own_recipe_file=own)


def _is_own_record(record: Path, run: Path) -> bool:
    try:
        text = record.read_text()
    except (OSError, UnicodeDecodeError):
        return False
    if text.startswith(RECIPE_HEADER):
        return True
    # A record written before the header existed: it equals the recipe stored in the run's checkpoints.
    try:
        parsed = yaml.safe_load(text)
        return any(read_meta(c).get("recipe") == parsed for c in complete_checkpoints(run))
    except (yaml.YAMLError, UserError, RecursionError):
        return False


def _occupied_error(run: Path, latest: Path | None) -> UserError:
    held = f"checkpoints up to {latest.name}" if latest is not None else "an export"
    if latest is None and complete_checkpoints(run):
        held = f"checkpoints up to {complete_checkpoints(run)[-1].name}"
    return UserError(
        f"output.dir {run} already holds another run ({held})",
        "resume it with checkpoint.resume=auto, start over with output.overwrite=true, or pick another output.dir",
    )


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _clear(run: Path) -> None:
    for name in RUN_OUTPUTS:
        target = run / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def _replace_file(path: Path, text: str) -> None:
    """Write through a temporary and rename, so a kill mid-write never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model_files(run_dir: Path, model, tokenizer) -> Path:
    """Write the model's config, generation config and tokenizer to <run_dir>/hf (no weights: those are in DCP)."""
    target = Path(run_dir) / MODEL_FILES
    target.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(target))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    return target
