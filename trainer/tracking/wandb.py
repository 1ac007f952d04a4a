"""Weights & Biases, optional: `tracking.wandb=true` logs every metrics.jsonl record to a W&B run.

The run lives in <output.dir>/wandb (offline: wandb/offline-run-*) with an id derived from output.dir, so a resumed run continues the same W&B run.
`tracking.wandb_mode=offline` (or WANDB_MODE=offline) writes it locally for a later `wandb sync`; auto is online
when an API key is configured (WANDB_API_KEY or a netrc login), else offline. Imported only when enabled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from trainer.errors import UserError


def check_wandb(tracking) -> None:
    """UserError before the run starts when W&B is enabled but not installed."""
    if tracking.wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("tracking.wandb=true needs the wandb package, which is not installed",
                        "pip install wandb (or 'moe-stack[tracking]'), or set tracking.wandb=false")


def resolve_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _netrc()
    return "online" if has_key else "offline"


class WandbLogger:
    """`log(record)` for each metrics record (numbers only, at the record's step); `close()` finishes the run."""

    def __init__(self, run):
        self.run = run

    def log(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and k != "step"}
        self.run.log(values, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def open_wandb(tracking, run_dir: Path, config: dict) -> WandbLogger | None:
    """A W&B run for this run directory (None when tracking.wandb is off)."""
    if not tracking.wandb:
        return None
    import wandb

    run_dir = Path(run_dir)
    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    run = wandb.init(project=tracking.wandb_project, name=tracking.wandb_run_name or run_dir.name, id=run_id,
                     resume="allow", dir=str(run_dir), mode=resolve_mode(tracking.wandb_mode), config=config)
    return WandbLogger(run)


def _netrc() -> str:
    try:
        return (Path.home() / ".netrc").read_text()
    except OSError:
        return ""
