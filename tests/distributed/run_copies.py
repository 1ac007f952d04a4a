"""Copies of a finished run, for the resume tests (called on every rank; rank 0 copies)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch.distributed as dist


def copy_back_to_step_2(source: Path, target: Path) -> None:
    """Rank 0: a copy of a 4-step run (checkpoints at 2 and 4) whose newest checkpoint is step 2; every rank waits
    for it."""
    if dist.get_rank() == 0:
        shutil.copytree(source, target)
        shutil.rmtree(target / "checkpoints" / "step_00000004")
        (target / "checkpoints" / "latest").write_text("step_00000002")
    dist.barrier()
