"""The expert side of expert parallelism, shared by the all-to-all and DeepEP dispatchers.

Both dispatchers send each token once to every rank that hosts at least one of its experts (not once per expert),
with the token's top-k ids translated to that rank's local expert ids (-1 = an expert elsewhere) and its weights
(0 where the id is -1). Here the R received tokens become S rows grouped by local expert, and after the expert MLP
each received token's rows are weighted and summed back into one row, which goes home to be summed over ranks:

    recv_x_RD, recv_idx_RK --expand--> rows_SD (by local expert) --MLP--> y_SD --reduce(w_RK)--> partial_RD

Every step is a gather or a scatter to unique positions (no atomics), so it is deterministic, and the two
dispatchers compute bit-identical partials from identical received tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertRows:
    """Layout of the rows this rank's experts compute. S rows, R received tokens, K = top-k.

    offsets_E: int32 cumulative rows per local expert; tokens_per_expert_E: int64 rows per local expert;
    expert_of_row_S: local expert of each row; pair_of_row_S: flat (received token * K + k) of each row.
    """

    offsets_E: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    expert_of_row_S: torch.Tensor
    pair_of_row_S: torch.Tensor
    num_received: int
    top_k: int


class RowsPlanMixin:
    """What the experts forward reads from an expert-parallel plan, delegated to its `rows: ExpertRows`."""

    rows: ExpertRows

    @property
    def offsets_E(self) -> torch.Tensor:
        return self.rows.offsets_E

    @property
    def tokens_per_expert_E(self) -> torch.Tensor:
        return self.rows.tokens_per_expert_E

    @property
    def expert_of_row_S(self) -> torch.Tensor:
        return self.rows.expert_of_row_S


def plan_expert_rows(recv_idx_RK: torch.Tensor, num_local_experts: int, num_rows: int) -> ExpertRows:
    """Sort the received (token, k) pairs by local expert (stable: ties keep arrival order); -1 pairs go last and
    are cut off. `num_rows` (the valid pair count) is known on the host from the count exchange, so no sync here."""
    flat_P = recv_idx_RK.reshape(-1)
    key_P = torch.where(flat_P >= 0, flat_P, torch.full_like(flat_P, num_local_experts))
    sorted_key_P, order_P = torch.sort(key_P, stable=True)
    expert_of_row_S = sorted_key_P[:num_rows]
    tokens_per_expert_E = torch.bincount(expert_of_row_S, minlength=num_local_experts)[:num_local_experts]
    return ExpertRows(
        offsets_E=torch.cumsum(tokens_per_expert_E, dim=0).to(torch.int32),
        tokens_per_expert_E=tokens_per_expert_E,
        expert_of_row_S=expert_of_row_S,
        pair_of_row_S=order_P[:num_rows],
        num_received=recv_idx_RK.shape[0],
        top_k=recv_idx_RK.shape[1],
    )


class _TokensToRows(torch.autograd.Function):
    """rows_SD = x_RD[pair // K]; backward scatters each row's gradient to its pair slot and sums the K slots."""

    @staticmethod
    def forward(ctx, x_RD, pair_of_row_S, top_k):
        ctx.save_for_backward(pair_of_row_S)
        ctx.top_k, ctx.num_received = top_k, x_RD.shape[0]
        return x_RD.index_select(0, torch.div(pair_of_row_S, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad_SD):
        (pair_of_row_S,) = ctx.saved_tensors
        grad_PD = grad_SD.new_zeros(ctx.num_received * ctx.top_k, grad_SD.shape[-1])
        grad_PD.index_copy_(0, pair_of_row_S, grad_SD)
        return grad_PD.view(ctx.num_received, ctx.top_k, grad_SD.shape[-1]).sum(dim=1), None, None


class _WeightedRowSum(torch.autograd.Function):
    """partial_RD[r] = sum_k w_RK[r, k] * y[pair (r, k)] (0 for pairs whose expert is elsewhere).

    Forward scatters the S rows into a zero-padded [R, K, D] buffer and sums with one batched [1, K] x [K, D] product
    per token (y's dtype, fp32 accumulation); the buffer is temporary. Backward needs only y_SD itself (which the
    expert MLP keeps anyway: same storage), not the padded buffer, which is R*K/S times larger (2x at EP=2):
        grad_y[s] = w[pair s] * grad[token of s],   grad_w[pair s] = <grad[token of s], y[s]> (fp32 sum).
    """

    @staticmethod
    def forward(ctx, y_SD, weights_RK, pair_of_row_S, num_received: int, top_k: int):
        ctx.save_for_backward(y_SD, weights_RK, pair_of_row_S)
        ctx.top_k = top_k
        y_PD = y_SD.new_zeros(num_received * top_k, y_SD.shape[-1]).index_copy_(0, pair_of_row_S, y_SD)
        y_RKD = y_PD.view(num_received, top_k, y_SD.shape[-1])
        return torch.bmm(weights_RK.to(y_SD.dtype).unsqueeze(1), y_RKD).squeeze(1)

    @staticmethod
    def backward(ctx, grad_RD):
        y_SD, weights_RK, pair_of_row_S = ctx.saved_tensors
        grad_rows_SD = grad_RD.index_select(0, torch.div(pair_of_row_S, ctx.top_k, rounding_mode="floor"))
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            weight_S = weights_RK.reshape(-1).index_select(0, pair_of_row_S).to(y_SD.dtype)
            grad_y = grad_rows_SD * weight_S.unsqueeze(1)
        if ctx.needs_input_grad[1]:
            dot_S = (grad_rows_SD.float() * y_SD.float()).sum(dim=-1).to(y_SD.dtype)  # rounded as the bmm's output
            grad_w = weights_RK.new_zeros(weights_RK.numel()).index_copy_(0, pair_of_row_S, dot_S.to(weights_RK.dtype))
            grad_w = grad_w.view_as(weights_RK)
        return grad_y, grad_w, None, None, None


def expand_to_rows(recv_x_RD: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
    """[R, D] received tokens -> [S, D] rows grouped by local expert."""
    return _TokensToRows.apply(recv_x_RD, rows.pair_of_row_S, rows.top_k)


def reduce_rows(y_SD: torch.Tensor, recv_weights_RK: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
    """[S, D] expert outputs -> [R, D]: per received token, its local experts' outputs weighted and summed
    (a [1, K] x [K, D] product per token, in y's dtype with fp32 accumulation inside the GEMM); autograd keeps only
    y_SD for the backward (`_WeightedRowSum`)."""
    return _WeightedRowSum.apply(y_SD, recv_weights_RK, rows.pair_of_row_S, rows.num_received, rows.top_k)
