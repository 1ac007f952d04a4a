"""Resumable training state with torch.distributed.checkpoint (DCP): model, optimizer, scheduler, data, RNG.

Layout of a run directory:

    <output.dir>/checkpoints/step_00000100/   one DCP checkpoint (each rank writes its shards) + meta.json
    <output.dir>/checkpoints/latest           the name of the newest complete checkpoint, written last

A checkpoint is written to `.tmp-step_*`, fsynced (files, then the directory), renamed into place when complete, and
only then does `latest` move to it (atomic replace, fsynced), so a crash or power loss at any moment leaves the
previous checkpoint intact and `latest` never points at a partial one. Before writing, the free space is checked
against the size of the state (a full disk must not be discovered half-way through a save). Every file's size and
SHA-256 go into `meta.json` and are verified before a resume or an export (`trainer.checkpoint.integrity`).

`latest` is only a hint: it must name a complete `step_*` directory inside `checkpoints/` (never a path elsewhere);
when it is missing (deleted, or lost with a crash) the newest complete checkpoint is found from the directory.

Non-tensor state (schedule, data position, RNG) goes through DCP's byte items; they are read back with
`torch.load(weights_only=True)`, so a checkpoint cannot run code through them. DCP's own `.metadata` index is a
pickle of its dataclasses: resume only from checkpoints this trainer wrote. DCP stores DTensor shards as they are, so the same code saves FSDP2/EP-sharded models and
reloads them under another world size; with one process it writes plain tensors.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainer.checkpoint.durable import replace_dir, write_atomically, write_synced
from trainer.checkpoint.integrity import checkpoint_digests, mismatched_files
from trainer.errors import UserError
from trainer.faults import fault_point

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
SPACE_MARGIN = 1.1  # DCP adds headers and per-file overhead on top of the raw tensor bytes
STEP_DIR = re.compile(r"step_\d{8}")


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
    """The newest complete checkpoint of a run directory, or None when it has none.

    `checkpoints/latest` names it; a pointer that names anything but a complete `step_*` directory of this run is a
    UserError (it is never followed elsewhere), and a missing pointer falls back to the newest complete checkpoint.
    """
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST
    if not pointer.exists() and not pointer.is_symlink():
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    try:
        name = pointer.read_text().strip() if pointer.is_file() and not pointer.is_symlink() else None
    except (OSError, UnicodeDecodeError):
        name = None
    path = root / name if name else None
    if path is None or not STEP_DIR.fullmatch(name) or not _is_complete(path):
        found = complete_checkpoints(run_dir)
        fix = (f"delete {pointer} to resume from the newest complete checkpoint ({found[-1].name})" if found
               else f"delete {pointer}; the directory holds no complete checkpoint")
        shown = repr(name[:80]) if name else "nothing readable"
        raise UserError(f"{pointer} names {shown}, which is not a complete checkpoint in {root}", fix)
    return path


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints (a `step_*` directory of its own with meta.json and .metadata), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and _is_complete(p))


def _is_complete(path: Path) -> bool:
    """A real directory directly inside checkpoints/ (no symlink out of the run) holding both index files."""
    return (not path.is_symlink() and path.is_dir() and path.resolve().parent == path.parent.resolve()
            and (path / META).is_file() and (path / ".metadata").is_file())


def read_meta(checkpoint: str | Path) -> dict:
    """meta.json of a checkpoint: {"step", "time", "world_size", "recipe", "inputs", "files"}; UserError if
    `checkpoint` is not one or its meta.json cannot be read."""
    path = Path(checkpoint) / META
    if not path.is_file():
        raise UserError(f"{checkpoint} is not a training checkpoint (no {META})", "pass a checkpoints/step_* directory")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise UserError(f"checkpoint {checkpoint} has an unreadable {META} ({type(err).__name__})",
                        _older_fix(Path(checkpoint))) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise UserError(f"checkpoint {checkpoint} has a {META} without a step number", _older_fix(Path(checkpoint)))
    return meta


def rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]  # plain types: weights_only loads
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _model_state(model) -> dict:
    """The model part of a checkpoint: everything, or for a LoRA run (`trainer.lora`) the trainable state only (the
    adapters, plus buffers); the frozen base comes from the model's own files, never from a checkpoint."""
    return get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=_trainable_only(model)))


def _set_model_state(model, state: dict) -> None:
    trainable_only = _trainable_only(model)  # DCP has loaded exactly the keys of `_model_state`; the rest is frozen
    set_model_state_dict(model, state, options=StateDictOptions(ignore_frozen_params=trainable_only,
                                                                strict=not trainable_only))


def _trainable_only(model) -> bool:
    from trainer.lora.inject import is_lora_model

    return is_lora_model(model)


def _state(model, optimizer, scheduler, loader, step: int) -> dict:
    return {
        "model": _model_state(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "trainer": {"step": step, "scheduler": scheduler.state_dict(), "loader": loader.state_dict()},
        f"rng/rank{_rank()}": rng_state(),  # one entry per rank: each rank has its own generators
    }


def save_checkpoint(run_dir, step: int, model, optimizer, scheduler, loader, keep_last: int, recipe: dict,
                    world_size: int = 1, keep: tuple[int, ...] = ()) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, keep only the newest `keep_last` (and the steps in
    `keep`: the best one by validation loss).

    `recipe` must already be redacted (it is stored in meta.json); its `inputs` attribute, when it has one
    (`trainer.run_dir.saved_recipe`), is stored next to it and checked on resume. UserError before anything is
    written when the disk cannot hold the checkpoint, and UserError (temporary removed, previous checkpoint
    untouched) when writing fails.
    """
    root = checkpoints_dir(run_dir)
    final, tmp = root / step_name(step), root / f".tmp-{step_name(step)}"
    state = _state(model, optimizer, scheduler, loader, step)
    check_disk_space(root, step, _all_ranks_sum(state_bytes(state)))
    try:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        with _quiet_single_process():
            dcp.save(state, checkpoint_id=str(tmp))  # DCP fsyncs every file it writes
        fault_point("MOE_FAULT_HANG_DURING_SAVE", step, f"hanging while saving checkpoint {step} (in {tmp.name})")
        files = checkpoint_digests(tmp, exclude=(META,))
        if _rank() == 0:
            meta = {"step": step, "time": time.time(), "world_size": world_size, "recipe": recipe,
                    "inputs": getattr(recipe, "inputs", {}), "files": files}
            write_synced(tmp / META, json.dumps(meta, indent=2))
            replace_dir(tmp, final)  # fsyncs every file first; a step saved again replaces its old copy in one swap
            write_atomically(root / LATEST, final.name)
    except (OSError, CheckpointException) as err:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = complete_checkpoints(run_dir)
        kept = f"{previous[-1].name} is intact" if previous else "no earlier checkpoint exists"
        raise UserError(f"cannot write checkpoint step {step} in {root} ({_first_line(err)}); {kept}",
                        "check free space and permissions of output.dir, then run the same command to resume") from None
    if _rank() == 0:
        _prune(root, keep_last, keep)
    _barrier()
    return final


def _first_line(err: BaseException) -> str:
    """The OS's words for a failure (DCP wraps them in per-rank exception dumps)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    for line in str(err).splitlines():
        if "Error" in line and ":" in line:
            return line.strip()[:200]
    return type(err).__name__


def state_bytes(state) -> int:
    """Bytes of the tensors this rank holds in `state` (DTensors count their local shard)."""
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def free_bytes(directory: Path) -> int:
    """Free space of the filesystem holding `directory` (its nearest existing parent)."""
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk_space(root: Path, step: int, needed: int) -> None:
    """UserError (one line) when the disk under `root` cannot hold a checkpoint of `needed` bytes."""
    needed = int(needed * SPACE_MARGIN)
    free = free_bytes(root)
    if free < needed:
        raise UserError(
            f"not enough disk space for checkpoint step {step} in {root}: needs about {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free",
            "free some space, lower checkpoint.keep_last, or point output.dir at a larger disk",
        )


def _all_ranks_sum(value: int) -> int:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        total = torch.tensor([value], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            total = total.cuda()
        dist.all_reduce(total)
        return int(total.item())
    return value


class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, except that byte items must load under `torch.load(weights_only=True)` (no arbitrary code)."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as err:
            raise UserError(f"checkpoint item {read_item.dest_index.fqn} holds more than plain data ({err})",
                            "resume only from checkpoints this trainer wrote") from None
        value.seek(0)
        super().load_bytes(read_item, value)


_VERIFIED: set[tuple[str, int]] = set()  # (checkpoint, meta.json mtime): hashed once per process, not per caller


def verify_checkpoint(checkpoint: str | Path) -> None:
    """UserError unless every file the checkpoint recorded is there with its size and SHA-256 (and, for
    checkpoints written before checksums, every shard the index names is there and long enough)."""
    checkpoint = Path(checkpoint)
    meta = read_meta(checkpoint)
    fix = _older_fix(checkpoint)
    key = (str(checkpoint.resolve()), (checkpoint / META).stat().st_mtime_ns)
    recorded = meta.get("files")
    if isinstance(recorded, dict) and recorded and key not in _VERIFIED:
        bad = mismatched_files(checkpoint, recorded)
        missing = [name for name in bad if not (checkpoint / name).is_file()]
        if missing:
            raise UserError(f"checkpoint {checkpoint} is missing shard file {missing[0]}", fix)
        if bad:
            raise UserError(f"checkpoint {checkpoint} is corrupt: {', '.join(bad[:3])} "
                            f"{'does' if len(bad) == 1 else 'do'} not match the checksum recorded when it was written",
                            fix)
        _VERIFIED.add(key)
    if not (checkpoint / ".metadata").is_file():
        raise UserError(f"checkpoint {checkpoint} is incomplete (no .metadata index)", fix)
    metadata = _read_index(checkpoint)
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = checkpoint / name
        if not shard.is_file():
            raise UserError(f"checkpoint {checkpoint} is missing shard file {name}", fix)
        if shard.stat().st_size < size:
            raise UserError(f"checkpoint {checkpoint} has a truncated shard file {name}", fix)


def _read_index(checkpoint: Path):
    """DCP's `.metadata` (a pickle of its dataclasses); a truncated or garbled one is a UserError, not a traceback."""
    try:
        return dcp.FileSystemReader(str(checkpoint)).read_metadata()
    except Exception as err:  # EOFError, UnpicklingError, ... whatever a damaged pickle raises
        raise UserError(f"checkpoint {checkpoint} has an unreadable .metadata index ({type(err).__name__})",
                        _older_fix(checkpoint)) from None


def _older_fix(checkpoint: Path) -> str:
    """How to get past a damaged checkpoint: name the newest other complete one of the same run, if there is one."""
    others = [p for p in complete_checkpoints(checkpoint.parent.parent) if p.name != checkpoint.name]
    older = f"resume from {others[-1]} (checkpoint.resume={others[-1]})" if others else \
        "resume from an older checkpoint (checkpoint.resume=<path>)"
    return f"{older} or start fresh with output.overwrite=true"


def load_checkpoint(checkpoint: str | Path, model, optimizer, scheduler, loader) -> int:
    """Restore everything `save_checkpoint` wrote into live objects; returns the step to continue after."""
    checkpoint = Path(checkpoint)
    verify_checkpoint(checkpoint)
    state = _state(model, optimizer, scheduler, loader, step=0)
    saved_keys = _read_index(checkpoint).state_dict_metadata.keys()
    rng_key = f"rng/rank{_rank()}"
    if not any(k.startswith(rng_key + ".") or k == rng_key for k in saved_keys):
        state.pop(rng_key)  # saved under another world size: keep this rank's fresh generators
    _load(state, checkpoint)
    _set_model_state(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    scheduler.load_state_dict(state["trainer"]["scheduler"])
    loader.load_state_dict(state["trainer"]["loader"])
    if rng_key in state:
        set_rng_state(state[rng_key])
    return int(state["trainer"]["step"])


def load_model_weights(checkpoint: str | Path, model) -> int:
    """Only the model part of a checkpoint (for export); returns its step."""
    meta = read_meta(checkpoint)
    verify_checkpoint(checkpoint)
    state = {"model": _model_state(model)}
    _load(state, checkpoint)
    _set_model_state(model, state["model"])
    return int(meta["step"])


def _load(state: dict, checkpoint: Path) -> None:
    """dcp.load with safe byte items; a checkpoint that does not fit the live model is a UserError."""
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(checkpoint), planner=_WeightsOnlyLoadPlanner())
    except UserError:
        raise
    except (Exception, CheckpointException) as err:  # DCP wraps rank failures in a BaseException subclass
        lines = [line.strip() for line in str(err).splitlines()]
        detail = next((line for line in lines if "mismatch" in line.lower() or "missing key" in line.lower()
                       or "shape" in line.lower()), type(err).__name__)
        raise UserError(f"checkpoint {checkpoint} does not fit the model being trained ({detail[:200]})",
                        "resume with the model config it was trained with, or start fresh with "
                        "checkpoint.resume=never output.overwrite=true") from None


def remove_stale_temporaries(run_dir) -> None:
    """Delete `.tmp-*` directories left by a run killed while saving."""
    root = checkpoints_dir(run_dir)
    if _rank() == 0 and root.is_dir():
        for tmp in root.glob(".tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
    _barrier()


def _prune(root: Path, keep_last: int, keep: tuple[int, ...] = ()) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    kept = {step_name(s) for s in keep}
    for old in steps[:-keep_last]:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)


def _as_tuples(value):
    """random.setstate wants tuples; a round trip through a checkpoint may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
