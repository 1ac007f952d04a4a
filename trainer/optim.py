"""AdamW and the learning-rate schedule (linear warmup, then cosine decay to `lr * min_lr_ratio`)."""

from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, kernel: str = "auto") -> torch.optim.AdamW:
    """AdamW over the trainable parameters; no weight decay on 1-D tensors (norms, biases, router biases).

    kernel (perf.optimizer): "fused" (one launch per step; CUDA only), "foreach", or "auto": fused when every
    parameter is on CUDA, foreach otherwise. Fused on CPU parameters falls back to foreach.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    on_cuda = all(p.device.type == "cuda" for p in params)
    kind = {"fused": True} if on_cuda and kernel in ("auto", "fused") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kind)


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Factor on the peak lr for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """LambdaLR applying `lr_multiplier`; its state (last_epoch) is checkpointed with the optimizer."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    )
