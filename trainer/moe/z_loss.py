"""Router z-loss (ST-MoE) as an opt-in training term: coef * mean over layers of mean_t logsumexp(logits_t)^2.

The router modules' logits are collected with forward hooks during the forward pass (not during an activation-
checkpoint recompute, which runs inside backward), so it works for every family with an adapter, whether or not
transformers records router logits for it.
"""

from __future__ import annotations

import torch

from trainer.moe.router import router_z_loss


def in_backward() -> bool:
    try:
        return torch._C._current_graph_task_id() != -1  # noqa: SLF001 - the autograd engine is running
    except AttributeError:  # pragma: no cover - very old torch
        return False


class RouterZLoss:
    """Collects each router's logits in the forward; `pop()` returns the z-loss of what was collected."""

    def __init__(self, routers: list[torch.nn.Module], coef: float):
        self.coef = coef
        self._logits: list[torch.Tensor] = []
        self._handles = [r.register_forward_hook(self._hook) for r in routers]

    def _hook(self, module, inputs, outputs) -> None:
        if not in_backward():
            self._logits.append(outputs[0])

    def pop(self) -> torch.Tensor | None:
        """coef * z-loss over the routers run since the last pop (None if none ran)."""
        if not self._logits:
            return None
        value = self.coef * router_z_loss(self._logits)
        self._logits = []
        return value

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def z_loss_for(model: torch.nn.Module, coef: float) -> RouterZLoss | None:
    """A collector over `model`'s routers, or None (coef 0, or a model without a fast-path adapter)."""
    adapter = getattr(model, "moe_adapter", None)
    if coef <= 0 or adapter is None:
        return None
    routers = adapter.router_modules(model)
    return RouterZLoss(routers, coef) if routers else None
