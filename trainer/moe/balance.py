"""Aux-loss-free load balancing (DeepSeek-V3): nudge each router's `e_score_correction_bias` towards balance.

After each optimizer step: bias += rate * sign(mean_load - load), with `load` the tokens routed to each expert
since the last update, summed over all data-parallel ranks (one all-reduce of [layers, E] int64 per step).
The bias only changes which experts are chosen, never the combine weights. transformers never updates this bias;
this is opt-in (`moe.aux_free_bias_rate > 0`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class AuxLossFreeBalancer:
    """Counts routed tokens per expert with forward hooks and updates the correction biases on `step()`."""

    def __init__(self, routers: list[torch.nn.Module], rate: float, group: dist.ProcessGroup | None = None):
        self.routers = [r for r in routers if getattr(r, "e_score_correction_bias", None) is not None]
        self.rate = rate
        self.group = group
        self._counts: list[torch.Tensor | None] = [None] * len(self.routers)
        self._handles = [r.register_forward_hook(self._make_hook(i)) for i, r in enumerate(self.routers)]

    def _make_hook(self, position: int):
        def hook(module, inputs, outputs):
            index_TK = outputs[2]
            flat = index_TK.reshape(-1).long()  # index_add_, not bincount: no host sync on CUDA
            counts_E = torch.zeros(module.e_score_correction_bias.numel(), device=flat.device).index_add_(
                0, flat, torch.ones_like(flat, dtype=torch.float32))
            previous = self._counts[position]
            self._counts[position] = counts_E if previous is None else previous + counts_E

        return hook

    @torch.no_grad()
    def step(self, apply: torch.Tensor | None = None) -> None:
        """Apply one bias update from the loads counted since the last call, then reset the counts. `apply`: a
        device flag (1.0 / 0.0) that scales the update, so a skipped step moves no bias without a host sync."""
        if not self.routers or any(c is None for c in self._counts):
            return
        loads_LE = torch.stack(self._counts).float()
        if self.group is not None or (dist.is_available() and dist.is_initialized()):
            dist.all_reduce(loads_LE, group=self.group)
        delta_LE = self.rate * torch.sign(loads_LE.mean(dim=-1, keepdim=True) - loads_LE)
        if apply is not None:
            delta_LE = delta_LE * apply.to(delta_LE.device)
        for router, delta_E in zip(self.routers, delta_LE):
            bias = router.e_score_correction_bias
            bias.add_(delta_E.to(device=bias.device, dtype=bias.dtype))
        self.reset()

    def reset(self) -> None:
        """Forget the loads counted since the last update (a skipped step must not move the biases)."""
        self._counts = [None] * len(self.routers)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def balancer_for(model: torch.nn.Module, rate: float) -> AuxLossFreeBalancer | None:
    """The balancer over `model`'s routers that have a correction bias, or None (rate 0, or no such router)."""
    adapter = getattr(model, "moe_adapter", None)
    if rate <= 0 or adapter is None:
        return None
    balancer = AuxLossFreeBalancer(adapter.router_modules(model), rate)
    return balancer if balancer.routers else None
