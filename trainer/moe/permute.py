"""Token permutation: sort (token, expert) pairs by expert once, gather rows, and undo it deterministically.

Both directions are gathers (no scatter-add, no atomics), so forward and backward are bit-reproducible on GPU:
dispatch's backward sums the K copies of each token with a reshape + sum, combine's backward is a gather by the
forward permutation. No host synchronisation happens here. On CUDA the two K-way sums (combine, dispatch's
backward) are one Triton kernel each (`trainer.kernels.row_sum`); elsewhere, compiled, Inductor fuses each gather
with its multiply and K-way sum.

Pairs may be marked as not computed here (`keep_TK` False: their expert lives on another rank, and the plan sorts
them past the last offset, where the grouped GEMMs write nothing). Their rows are never read: combine selects 0 for
them and dispatch's backward leaves them out of each token's sum (a select, not a multiply by 0, so whatever the
unwritten rows hold cannot leak in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.kernels import bounded_rows, row_sum


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


def token_of_row(perm_S: torch.Tensor, top_k: int) -> torch.Tensor:
    """The token each row (in expert order) came from: flat pair index // K."""
    return torch.div(perm_S, top_k, rounding_mode="floor")


def _gathered_sum(rows_SD, index_S, top_k: int, weights_TK=None, keep_TK=None) -> torch.Tensor | None:
    """sum_k [w *] rows[index[t, k]] over kept pairs with the Triton kernel (`trainer.kernels.row_sum`), or None
    where it cannot run (CPU, no Triton): the caller then uses the torch formula."""
    if not row_sum.usable(rows_SD, index_S, weights_TK, keep_TK):
        return None
    return row_sum.gathered_row_sum(rows_SD, index_S.view(-1, top_k), weights_TK, keep_TK)


def _rows(src_ND, index_S, bound_1=None, scale_S=None) -> torch.Tensor:
    """src[index] (times scale), per row; with a bound (pairs computed elsewhere sorted past it) only the rows below
    it are written where the bounded kernel runs (`trainer.kernels.bounded_rows`)."""
    if bound_1 is not None and bounded_rows.usable(src_ND, index_S, bound_1, scale_S):
        return bounded_rows.gather_rows(src_ND, index_S, bound_1, scale_S)
    rows = src_ND.index_select(0, index_S)
    return rows if scale_S is None else rows * scale_S.unsqueeze(1)


def _bound(plan: RoutingPlan, keep_TK: torch.Tensor | None) -> torch.Tensor | None:
    """The rows computed here (the plan's last offset) when some pairs are computed elsewhere, else None."""
    return plan.offsets_E[-1:] if keep_TK is not None else None


def _kept(rows_TKD: torch.Tensor, keep_TK: torch.Tensor | None) -> torch.Tensor:
    """The pairs' rows, 0 where the pair is not computed here."""
    if keep_TK is None:
        return rows_TKD
    return torch.where(keep_TK.unsqueeze(-1), rows_TKD, rows_TKD.new_zeros(()))


class _ScatterTokensToRows(torch.autograd.Function):
    """x_TD -> x_SD with row s = token perm[s] // K; backward sums each token's K row gradients (kept pairs only)."""

    @staticmethod
    def forward(ctx, x_TD, perm_S, inv_perm_S, top_k, keep_TK, bound_1):
        ctx.save_for_backward(inv_perm_S, keep_TK)
        ctx.top_k = top_k
        return _rows(x_TD, token_of_row(perm_S, top_k), bound_1)

    @staticmethod
    def backward(ctx, grad_SD):
        inv_perm_S, keep_TK = ctx.saved_tensors
        grad_TD = _gathered_sum(grad_SD.contiguous(), inv_perm_S, ctx.top_k, keep_TK=keep_TK)
        if grad_TD is None:
            grad_TKD = grad_SD.index_select(0, inv_perm_S).view(-1, ctx.top_k, grad_SD.shape[-1])
            grad_TD = _kept(grad_TKD, keep_TK).sum(dim=1)
        return grad_TD, None, None, None, None, None


def permute_tokens(x_TD: torch.Tensor, plan: RoutingPlan, keep_TK: torch.Tensor | None = None) -> torch.Tensor:
    """[T, D] tokens -> [T*K, D] rows grouped by expert. `keep_TK`: which pairs are computed here (None: all)."""
    return _ScatterTokensToRows.apply(x_TD, plan.perm_S, plan.inv_perm_S, plan.top_k, keep_TK, _bound(plan, keep_TK))


def unpermute_and_combine(y_SD: torch.Tensor, weights_TK: torch.Tensor, plan: RoutingPlan,
                          keep_TK: torch.Tensor | None = None) -> torch.Tensor:
    """[T*K, D] expert outputs in expert order -> [T, D] weighted sum over each token's K experts (the kept ones:
    `keep_TK`, None = all)."""
    return _CombineRows.apply(y_SD, weights_TK, plan.perm_S, plan.inv_perm_S, keep_TK, _bound(plan, keep_TK))


class _CombineRows(torch.autograd.Function):
    """out_TD[t] = sum_k w_TK[t, k] * y_SD[row of (t, k)]: the expert outputs back in token order, weighted.

    On CUDA the forward is the Triton row sum (`trainer.kernels.row_sum`: fp32 accumulation, rows of pairs not kept
    never loaded). Elsewhere, eagerly, the K-way sum is a batched [1, K] x [K, D] product per token (fp32
    accumulation inside the GEMM); compiled it is written as a multiply and a sum, which Inductor fuses with the
    gather into one kernel per direction (the gathered [T, K, D] rows are never written). The backward is gathers
    only: dy for a row is w * dout of its token.
    """

    @staticmethod
    def forward(ctx, y_SD, weights_TK, perm_S, inv_perm_S, keep_TK, bound_1):
        ctx.save_for_backward(y_SD, weights_TK, perm_S, inv_perm_S, keep_TK, bound_1)
        num_tokens, top_k = weights_TK.shape
        out_TD = _gathered_sum(y_SD, inv_perm_S, top_k, weights_TK.contiguous(), keep_TK)
        if out_TD is not None:
            return out_TD
        y_TKD = _kept(y_SD.index_select(0, inv_perm_S).view(num_tokens, top_k, -1), keep_TK)
        weights_TK = weights_TK.to(y_SD.dtype)
        if torch.compiler.is_compiling():
            return (weights_TK.unsqueeze(-1).float() * y_TKD.float()).sum(dim=1).to(y_SD.dtype)
        return torch.bmm(weights_TK.unsqueeze(1), y_TKD).squeeze(1)

    @staticmethod
    def backward(ctx, grad_out_TD):
        y_SD, weights_TK, perm_S, inv_perm_S, keep_TK, bound_1 = ctx.saved_tensors
        num_tokens, top_k = weights_TK.shape
        grad_out_TD = grad_out_TD.to(y_SD.dtype).contiguous()
        if not ctx.needs_input_grad[1]:
            grad_weights_TK = None
        elif row_sum.usable(y_SD, inv_perm_S, grad_out_TD, keep_TK):
            grad_weights_TK = row_sum.gathered_row_dots(y_SD, inv_perm_S.view(-1, top_k), grad_out_TD, keep_TK)
        else:
            y_TKD = _kept(y_SD.index_select(0, inv_perm_S).view(num_tokens, top_k, -1), keep_TK)
            if torch.compiler.is_compiling():
                grad_weights_TK = (y_TKD.float() * grad_out_TD.unsqueeze(1).float()).sum(dim=-1)
            else:
                grad_weights_TK = torch.bmm(y_TKD, grad_out_TD.unsqueeze(2)).squeeze(2)
        weight_of_row_S = weights_TK.reshape(-1).index_select(0, perm_S).to(y_SD.dtype)
        grad_y_SD = _rows(grad_out_TD, token_of_row(perm_S, top_k), bound_1, weight_of_row_S)
        if grad_weights_TK is not None:
            grad_weights_TK = grad_weights_TK.to(weights_TK.dtype)
        return grad_y_SD, grad_weights_TK, None, None, None, None
