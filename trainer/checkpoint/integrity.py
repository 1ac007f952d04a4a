"""Checksums of checkpoint files: recorded when a checkpoint is written, verified before it is resumed or exported.

A flipped bit or a shard cut short by a full disk loads without complaint (DCP checks neither), and the run goes on
from garbage: NaN losses, then checkpoints of garbage that prune the last good one. So every file of a checkpoint
(DCP's `.metadata` index and each `.distcp` shard) gets its size and SHA-256 recorded in `meta.json` at save time,
and a checkpoint whose files do not match is refused before anything is loaded.

Hashing reads every byte once. Under torchrun the files are split across ranks (rank r hashes every world-th file
in name order) and the results are gathered, so each rank reads only its share and every rank reaches the same
verdict (a refusal raises on all ranks, so none is left waiting in a collective).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch.distributed as dist

CHUNK = 8 << 20  # 8 MiB reads: large enough to stream at disk speed, small enough to keep memory flat


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def file_digest(path: Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of one file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _gathered(local: dict) -> dict:
    """Union of every rank's dict (each rank computed a disjoint share)."""
    rank, world = _world()
    if world == 1:
        return local
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def checkpoint_digests(directory: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """Size and SHA-256 of every file directly in `directory` (collective under torchrun: call on every rank)."""
    rank, world = _world()
    names = sorted(p.name for p in Path(directory).iterdir() if p.is_file() and p.name not in exclude)
    return _gathered({name: file_digest(Path(directory) / name) for name in names[rank::world]})


def mismatched_files(directory: Path, recorded: dict[str, dict]) -> list[str]:
    """Names of recorded files that are missing or whose size or SHA-256 differ (collective under torchrun)."""
    rank, world = _world()
    names = sorted(recorded)
    bad = {}
    for name in names[rank::world]:
        path = Path(directory) / name
        if not path.is_file():
            bad[name] = "missing"
        elif path.stat().st_size != recorded[name].get("bytes") or file_digest(path) != recorded[name]:
            bad[name] = "changed"
    return sorted(_gathered(bad))
