"""Expert-parallel dispatcher on `torch.distributed.all_to_all_single` (NCCL on GPU, gloo on CPU).

Per MoE layer, with T local tokens, top-k K, `ep` ranks holding E/ep experts each:

1. layout: which ranks each token goes to (`is_token_in_rank_TR`); tokens are sent grouped by destination rank in
   token order, once per rank (not once per expert), with their local expert ids and weights for that rank;
2. one all_to_all of the [ep, 2] counts (tokens, (token, expert) pairs), then ONE host sync: all_to_all_single needs
   the split sizes as Python lists, and the expert side needs its row count. This is the only host sync per layer;
3. all_to_all of the token rows [n, D] and of the ids+weights [n, 2K] (fp32, ids are exact small integers);
4. the expert side groups the received tokens' (token, expert) pairs by local expert (`expert_rows.py`), runs the
   grouped MLP, weights and sums each token's rows; one all_to_all sends [R, D] partials home;
5. home sums the partials over ranks in rank order in fp32 and casts once (the arithmetic DeepEP's combine does).

Every rank joins every collective even when it sends or receives nothing (zero-sized splits), so experts without
tokens never hang a step. Backward is the reverse all_to_all; the token gather's backward sums the per-rank copies
in rank order in fp32 (no atomics), so gradients are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.parallel.expert_rows import ExpertRows, RowsPlanMixin, expand_to_rows, plan_expert_rows, reduce_rows


class _AllToAll(torch.autograd.Function):
    """Rows [sum(input_splits), ...] -> [sum(output_splits), ...]; backward swaps the splits."""

    @staticmethod
    def forward(ctx, x, output_splits: list[int], input_splits: list[int], group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


def all_to_all_rows(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Differentiable `all_to_all_single` over dim 0 with per-rank split sizes."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


class _AllToAllPair(torch.autograd.Function):
    """Two row tensors sent with the same splits, as ONE autograd node.

    Two separate nodes could run their backward collectives in a different order on different ranks (the autograd
    engine orders ready nodes by graph shape, and ranks whose experts got no tokens have a different graph), which
    deadlocks. One node always issues its two collectives in the same order.
    """

    @staticmethod
    def forward(ctx, a, b, output_splits: list[int], input_splits: list[int], group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        ctx.likes = ((a.shape[1:], a.dtype), (b.shape[1:], b.dtype))
        return _all_to_all(a, output_splits, input_splits, group), _all_to_all(b, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        grads = []
        device = next(g.device for g in (grad_a, grad_b) if g is not None)
        for grad, (shape, dtype) in zip((grad_a, grad_b), ctx.likes):
            if grad is None:
                grad = torch.zeros((sum(ctx.output_splits), *shape), dtype=dtype, device=device)
            grads.append(_all_to_all(grad, ctx.input_splits, ctx.output_splits, ctx.group))
        return grads[0], grads[1], None, None, None


class _GatherTokensByRank(torch.autograd.Function):
    """x_TD -> x_TD[token_of_row_N] (rows grouped by rank); backward sums each rank's chunk in rank order in fp32."""

    @staticmethod
    def forward(ctx, x_TD, token_of_row_N, rows_per_rank: list[int]):
        ctx.save_for_backward(token_of_row_N)
        ctx.rows_per_rank, ctx.num_tokens = rows_per_rank, x_TD.shape[0]
        return x_TD.index_select(0, token_of_row_N)

    @staticmethod
    def backward(ctx, grad_ND):
        (token_of_row_N,) = ctx.saved_tensors
        return sum_rows_by_rank(grad_ND, token_of_row_N, ctx.rows_per_rank, ctx.num_tokens), None, None


def sum_rows_by_rank(rows_ND: torch.Tensor, token_of_row_N: torch.Tensor, rows_per_rank: list[int], num_tokens: int):
    """out[t] = sum over ranks (ascending) of that rank's row for token t, accumulated in fp32, cast to rows' dtype.
    Within one rank's chunk every token appears at most once, so each index_add has no colliding writes."""
    out_TD = rows_ND.new_zeros(num_tokens, rows_ND.shape[-1], dtype=torch.float32)
    start = 0
    for count in rows_per_rank:
        if count:
            out_TD = out_TD.index_add(0, token_of_row_N[start : start + count], rows_ND[start : start + count].float())
        start += count
    return out_TD.to(rows_ND.dtype)


@dataclass
class AllToAllPlan(RowsPlanMixin):
    """What combine needs to send results home. N rows sent (token x destination rank), R received."""

    rows: ExpertRows
    token_of_row_N: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_weights_RK: torch.Tensor
    num_tokens: int


class AllToAllDispatcher:
    """Expert parallelism over `group` (the mesh's "ep" dimension); rank r holds experts [r*E/ep, (r+1)*E/ep)."""

    name = "alltoall"
    weights_at_dispatch = True  # the expert side weights its rows, so the weights travel with the tokens

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.ep_size = dist.get_world_size(group)

    def dispatch(self, x_TD, top_k_index_TK, num_experts, top_k_weights_TK=None):
        """[T, D] tokens, [T, K] global expert ids and weights -> ([S, D] rows for the local experts, plan)."""
        ep, (num_tokens, top_k) = self.ep_size, top_k_index_TK.shape
        experts_per_rank = num_experts // ep
        if top_k_weights_TK is None:
            raise ValueError("the all-to-all dispatcher needs the routing weights at dispatch")

        dest_rank_TK = torch.div(top_k_index_TK, experts_per_rank, rounding_mode="floor")
        in_rank_RT = torch.zeros(ep, num_tokens, dtype=torch.bool, device=x_TD.device)
        in_rank_RT.scatter_(0, dest_rank_TK.t(), True)
        tokens_per_rank_R = in_rank_RT.sum(dim=1)
        pairs_per_rank_R = torch.bincount(dest_rank_TK.reshape(-1), minlength=ep)
        send_counts_R2 = torch.stack([tokens_per_rank_R, pairs_per_rank_R], dim=1)
        recv_counts_R2 = torch.empty_like(send_counts_R2)
        dist.all_to_all_single(recv_counts_R2, send_counts_R2, group=self.group)
        # The one host sync per layer: split sizes for the collectives and the expert side's row count.
        host = torch.cat([tokens_per_rank_R, recv_counts_R2.reshape(-1)]).tolist()
        send_splits, recv_splits = host[:ep], host[ep::2]
        num_rows = sum(host[ep + 1 :: 2])
        num_sent = sum(send_splits)

        # Send layout: (rank, token) pairs with the mask set, rank-major, token order within a rank.
        order_RT = torch.sort((~in_rank_RT).reshape(-1).to(torch.int8), stable=True)[1][:num_sent]
        token_of_row_N = order_RT % num_tokens
        rank_of_row_N = torch.div(order_RT, num_tokens, rounding_mode="floor")
        local_NK = top_k_index_TK.index_select(0, token_of_row_N) - (rank_of_row_N * experts_per_rank).unsqueeze(1)
        here_NK = (local_NK >= 0) & (local_NK < experts_per_rank)
        weights_NK = torch.where(here_NK, top_k_weights_TK.float().index_select(0, token_of_row_N), 0.0)
        meta_NK2 = torch.cat([weights_NK, torch.where(here_NK, local_NK, -1).to(torch.float32)], dim=1)

        send_x_ND = _GatherTokensByRank.apply(x_TD, token_of_row_N, send_splits)
        recv_x_RD, recv_meta_RK2 = _AllToAllPair.apply(send_x_ND, meta_NK2, recv_splits, send_splits, self.group)
        recv_idx_RK = recv_meta_RK2[:, top_k:].detach().to(torch.int64)
        rows = plan_expert_rows(recv_idx_RK, experts_per_rank, num_rows)
        plan = AllToAllPlan(rows, token_of_row_N, send_splits, recv_splits, recv_meta_RK2[:, :top_k], num_tokens)
        return expand_to_rows(recv_x_RD, rows), plan

    def combine(self, y_SD, top_k_weights_TK, plan: AllToAllPlan):
        """[S, D] expert outputs -> [T, D] in the caller's token order (weights were applied on the expert side)."""
        partial_RD = reduce_rows(y_SD, plan.recv_weights_RK, plan.rows)
        home_ND = all_to_all_rows(partial_RD, plan.send_splits, plan.recv_splits, self.group)
        return sum_rows_by_rank(home_ND, plan.token_of_row_N, plan.send_splits, plan.num_tokens)
