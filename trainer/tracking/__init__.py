"""Experiment trackers beside metrics.jsonl and TensorBoard (`tracking` recipe section)."""

from trainer.tracking.wandb import check_wandb, open_wandb

__all__ = ["check_wandb", "open_wandb"]
