"""Token permutation: sort (token, expert) pairs by expert once, gather rows, and undo it deterministically.

Both directions are gathers (no scatter-add, no atomics), so forward and backward are bit-reproducible on GPU:
dispatch's backward sums the K copies of each token with a reshape + sum, combine's backward is a gather by the
forward permutation. No host synchronisation happens here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RoutingPlan:
    """Where each (token, k) pair went. S = T * K rows in expert order.

    perm_S: sorted row -> flat pair index (token * K + k); inv_perm_S: its inverse;
    offsets_E: int32 cumulative rows per expert (grouped-GEMM offsets); tokens_per_expert_E: int64 counts.
    """

    perm_S: torch.Tensor
    inv_perm_S: torch.Tensor
    offsets_E: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    num_tokens: int
    top_k: int
    expert_of_row_S: torch.Tensor | None = None


def make_plan(index_TK: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Sort the flat (token, k) pairs by expert (stable, so ties keep token order)."""
    flat_S = index_TK.reshape(-1)
    expert_of_row_S, perm_S = torch.sort(flat_S, stable=True)
    inv_perm_S = torch.empty_like(perm_S)
    inv_perm_S[perm_S] = torch.arange(perm_S.numel(), device=perm_S.device)
    # scatter_add, not bincount: bincount reads the maximum back to the host to size its output (a sync per layer);
    # integer atomics are exact, so the counts stay deterministic.
    tokens_per_expert_E = torch.zeros(num_experts, dtype=torch.long, device=flat_S.device).scatter_add_(
        0, flat_S, torch.ones_like(flat_S)
    )
    offsets_E = torch.cumsum(tokens_per_expert_E, dim=0).to(torch.int32)
    return RoutingPlan(
        perm_S=perm_S,
        inv_perm_S=inv_perm_S,
        offsets_E=offsets_E,
        tokens_per_expert_E=tokens_per_expert_E,
        num_tokens=index_TK.shape[0],
        top_k=index_TK.shape[1],
        expert_of_row_S=expert_of_row_S,
    )


class _ScatterTokensToRows(torch.autograd.Function):
    """x_TD -> x_SD with row s = token perm[s] // K; backward sums each token's K row gradients."""

    @staticmethod
    def forward(ctx, x_TD, perm_S, inv_perm_S, top_k):
        ctx.save_for_backward(inv_perm_S)
        ctx.top_k = top_k
        return x_TD.index_select(0, torch.div(perm_S, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_SD):
        (inv_perm_S,) = ctx.saved_tensors
        grad_TKD = grad_SD.index_select(0, inv_perm_S).view(-1, ctx.top_k, grad_SD.shape[-1])
        return grad_TKD.sum(dim=1), None, None, None


class _GatherRows(torch.autograd.Function):
    """y = x[order] for a permutation `order`; backward is the gather by the inverse permutation."""

    @staticmethod
    def forward(ctx, x_SD, order_S, inverse_S):
        ctx.save_for_backward(inverse_S)
        return x_SD.index_select(0, order_S)

    @staticmethod
    def backward(ctx, grad_SD):
        (inverse_S,) = ctx.saved_tensors
        return grad_SD.index_select(0, inverse_S), None, None


def permute_tokens(x_TD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """[T, D] tokens -> [T*K, D] rows grouped by expert."""
    return _ScatterTokensToRows.apply(x_TD, plan.perm_S, plan.inv_perm_S, plan.top_k)


def unpermute_and_combine(y_SD: torch.Tensor, weights_TK: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """[T*K, D] expert outputs in expert order -> [T, D] weighted sum over each token's K experts.

    The K-way sum is a batched [1, K] x [K, D] product per token (fp32 accumulation inside the GEMM).
    """
    y_TKD = _GatherRows.apply(y_SD, plan.inv_perm_S, plan.perm_S).view(plan.num_tokens, plan.top_k, -1)
    return torch.bmm(weights_TK.to(y_TKD.dtype).unsqueeze(1), y_TKD).squeeze(1)
