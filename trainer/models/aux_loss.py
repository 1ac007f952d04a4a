"""The router load-balancing loss without host synchronisation.

transformers' `load_balancing_loss_func` (Switch Transformer eqs. 4-6, one copy per MoE family) counts each layer's
top-k assignments with `torch.bincount`, which on CUDA reads the indices' min and max back to the host to size its
output: two synchronisations per layer per step (24 on a 12-layer model). Each one stops the host from queueing
work ahead of the GPU, which then idles while the next kernels are launched. `sync_free_load_balancing_loss` is the
same loss with the counts made by a scatter-add into a fixed [num_experts] vector.

`use_sync_free_aux_loss(model)` installs it in the model's modeling module, after checking on random inputs (with
and without an attention mask) that it gives transformers' value there; if not, transformers' stays.
"""

from __future__ import annotations

import sys

import torch

_FUNCTION_NAME = "load_balancing_loss_func"


def sync_free_load_balancing_loss(gate_logits, num_experts: int | None = None, top_k: int = 2,
                                  attention_mask: torch.Tensor | None = None):
    """Switch-Transformer auxiliary loss over the layers' router logits ([rows, num_experts] each), as transformers
    5.x computes it: num_experts * sum_e (assignments to e / rows) * (mean routing probability of e)."""
    if gate_logits is None or not isinstance(gate_logits, tuple):
        return 0
    device = gate_logits[0].device
    assignments_E = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probability_E = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = 0.0
    mask_R = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    for logits_RE in gate_logits:
        probs_RE = torch.nn.functional.softmax(logits_RE.to(device), dim=-1)
        chosen_RK = torch.topk(probs_RE, top_k, dim=-1).indices.reshape(-1)
        if mask_R is None:
            counted = torch.ones(chosen_RK.shape[0], dtype=torch.float32, device=device)
            probability_E = probability_E + probs_RE.float().sum(dim=0)
            rows = rows + probs_RE.shape[0]
        else:
            counted = mask_R.repeat_interleave(top_k)
            probability_E = probability_E + (probs_RE.float() * mask_R.unsqueeze(-1)).sum(dim=0)
            rows = rows + mask_R.sum()
        assignments_E = assignments_E + torch.zeros_like(assignments_E).scatter_add_(0, chosen_RK, counted)
    return torch.sum((assignments_E / rows) * (probability_E / rows).unsqueeze(0)) * num_experts


def _agrees_with(reference, num_experts: int, top_k: int) -> bool:
    generator = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(12, num_experts, generator=generator) for _ in range(3))
    mask = (torch.rand(3, 4, generator=generator) > 0.3).long()
    try:
        for attention_mask in (None, mask):
            want = reference(logits, num_experts, top_k, attention_mask)
            got = sync_free_load_balancing_loss(logits, num_experts, top_k, attention_mask)
            if not torch.allclose(torch.as_tensor(got), torch.as_tensor(want), rtol=1e-6, atol=1e-7):
                return False
    except Exception:
        return False
    return True


def use_sync_free_aux_loss(model: torch.nn.Module) -> str | None:
    """Install the sync-free loss in `model`'s modeling module (idempotent); a note saying what happened, or None
    when the module computes no load-balancing loss of this kind."""
    module = sys.modules.get(type(model).__module__)
    current = getattr(module, _FUNCTION_NAME, None)
    if current is None:
        return None
    if current is sync_free_load_balancing_loss:
        return "router aux loss without host synchronisation"
    num_experts = int(getattr(model.config, "num_experts", None) or getattr(model.config, "num_local_experts", 8))
    top_k = int(getattr(model.config, "num_experts_per_tok", 2))
    if not _agrees_with(current, num_experts, max(1, min(top_k, num_experts))):
        return "router aux loss: transformers' (the sync-free one differs for this family)"
    setattr(module, _FUNCTION_NAME, sync_free_load_balancing_loss)
    return "router aux loss without host synchronisation"
