"""Resume rules across meshes.

DCP stores every DTensor shard with its global offsets, so model and optimizer state reshard on load: a checkpoint
written under one mesh layout (EP=2 x FSDP=2, say) resumes under any other layout of the same world size (EP=4,
FSDP=4, HSDP). A different world size is refused: it changes the global batch (every rank is a data-parallel rank)
and so the run being resumed; the weights can still seed a new run through the exported HF checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from trainer.errors import UserError

_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def saved_world_size(checkpoint: str | Path) -> int | None:
    """World size that wrote a DCP checkpoint: meta.json's `world_size`, else the number of per-rank files."""
    checkpoint = Path(checkpoint)
    meta = checkpoint / "meta.json"
    if meta.is_file():
        recorded = json.loads(meta.read_text()).get("world_size")
        if isinstance(recorded, int):
            return recorded
    ranks = {int(m.group(1)) for p in checkpoint.glob("*.distcp") if (m := _RANK_FILE.match(p.name))}
    return max(ranks) + 1 if ranks else None


def check_resume_world_size(checkpoint: str | Path, world_size: int) -> None:
    """UserError when `checkpoint` was written by a different number of processes than this run has."""
    saved = saved_world_size(checkpoint)
    if saved is not None and saved != world_size:
        raise UserError(
            f"checkpoint {checkpoint} was written by {saved} processes but this run has {world_size}",
            f"relaunch with {saved} processes (ep_size / dp_shard_size may differ), or start a new run from the "
            "exported Hugging Face checkpoint (checkpoint.resume=never)",
        )
