"""The tests' training loop: `steps` optimizer steps of `trainer.perf`'s loss on fixed token ids."""

from __future__ import annotations

import torch

from trainer.perf import PerfOptions, causal_lm_loss
from trainer.step_optimizer import build_optimizer, step_stream


def train_steps(model: torch.nn.Module, options: PerfOptions, ids: torch.Tensor, steps: int, lr: float):
    """Build the optimizer `options` asks for and take `steps` steps (labels = ids). Returns (optimizer, losses);
    held-back updates (`defer`) are applied before returning, so the parameters can be compared."""
    with step_stream(options, ids.device):
        optimizer = build_optimizer(model, options, lr=lr)
        losses = []
        for _ in range(steps):
            loss = causal_lm_loss(model, ids, ids, options).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if hasattr(optimizer, "flush"):
            optimizer.flush()
    return optimizer, losses
