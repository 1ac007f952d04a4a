"""Resumable training state with torch.distributed.checkpoint (DCP): model, optimizer, scheduler, data, RNG.

Layout of a run directory:

    <output.dir>/checkpoints/step_00000100/   one DCP checkpoint (each rank writes its shards) + meta.json
    <output.dir>/checkpoints/latest           the name of the newest complete checkpoint, written last

A checkpoint is written to `.tmp-step_*`, renamed into place when complete, and only then does `latest` move to it
(atomic replace), so a crash at any moment leaves the previous checkpoint intact and `latest` never points at a
partial one. DCP stores DTensor shards as they are, so the same code saves FSDP2/EP-sharded models and
reloads them under another world size; with one process it writes plain tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainer.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"



@contextlib.contextmanager
def _quiet_single_process():
    """Single-process DCP warns that no process group exists; that is the intended mode there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoints_dir(run_dir) / pointer.read_text().strip()
    return path if (path / META).is_file() else None


def read_meta(checkpoint: str | Path) -> dict:
    """meta.json of a checkpoint: {"step", "time", "recipe"}; UserError if `checkpoint` is not one."""
    path = Path(checkpoint) / META
    if not path.is_file():
        raise UserError(f"{checkpoint} is not a training checkpoint (no {META})", "pass a checkpoints/step_* directory")
    return json.loads(path.read_text())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state(model, optimizer, scheduler, loader, step: int) -> dict:
    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "trainer": {"step": step, "scheduler": scheduler.state_dict(), "loader": loader.state_dict()},
        f"rng/rank{_rank()}": rng_state(),  # one entry per rank: each rank has its own generators
    }


def save_checkpoint(run_dir, step: int, model, optimizer, scheduler, loader, keep_last: int, recipe: dict) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep only the newest `keep_last`."""
    root = checkpoints_dir(run_dir)
    final, tmp = root / step_name(step), root / f".tmp-{step_name(step)}"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with _quiet_single_process():
        dcp.save(_state(model, optimizer, scheduler, loader, step), checkpoint_id=str(tmp))
    if _rank() == 0:
        (tmp / META).write_text(json.dumps({"step": step, "time": time.time(), "recipe": recipe}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomically(root / LATEST, final.name)
        _prune(root, keep_last)
    _barrier()
    return final


def load_checkpoint(checkpoint: str | Path, model, optimizer, scheduler, loader) -> int:
    """Restore everything `save_checkpoint` wrote into live objects; returns the step to continue after."""
    checkpoint = Path(checkpoint)
    read_meta(checkpoint)
    state = _state(model, optimizer, scheduler, loader, step=0)
    saved_keys = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata.keys()
    rng_key = f"rng/rank{_rank()}"
    if not any(k.startswith(rng_key + ".") or k == rng_key for k in saved_keys):
        state.pop(rng_key)  # saved under another world size: keep this rank's fresh generators
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(checkpoint))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    scheduler.load_state_dict(state["trainer"]["scheduler"])
    loader.load_state_dict(state["trainer"]["loader"])
    if rng_key in state:
        set_rng_state(state[rng_key])
    return int(state["trainer"]["step"])


def load_model_weights(checkpoint: str | Path, model) -> int:
    """Only the model part of a checkpoint (for export); returns its step."""
    meta = read_meta(checkpoint)
    state = {"model": get_model_state_dict(model)}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(checkpoint))
    set_model_state_dict(model, state["model"])
    return int(meta["step"])


def remove_stale_temporaries(run_dir) -> None:
    """Delete `.tmp-*` directories left by a run killed while saving."""
    root = checkpoints_dir(run_dir)
    if _rank() == 0 and root.is_dir():
        for tmp in root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    _barrier()


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
