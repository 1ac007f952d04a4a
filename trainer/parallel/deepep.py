"""Expert-parallel dispatcher on DeepEP v1 normal (high-throughput) kernels: NVLink within a node, RDMA across nodes.

    layout   = buffer.get_dispatch_layout(top_k_index, E)              per-rank / per-expert counts, token-in-rank mask
    recv     = buffer.dispatch(x, topk_idx, topk_weights, layout)      each token once per destination rank
    rows     = expert_rows (shared with the all-to-all dispatcher)     grouped by local expert -> MLP -> weighted sum
    y        = buffer.combine(partial, handle)                         sum over ranks in rank order, fp32 accumulate
Backward is the reverse operation: dispatch's backward is a combine (it also sums the routing-weight gradients),
combine's backward is a cached dispatch with the forward's handle. The semantics and the arithmetic equal the
all-to-all dispatcher's, so the two agree bit for bit in the forward pass.

DeepEP moves bf16 tokens only; other dtypes (fp32 training) go through the all-to-all dispatcher instead.
Under activation-checkpoint recompute the layout computed in the forward pass is replayed (no second
`get_dispatch_layout`). Buffers are sized from DeepEP's own hints and released by `close()` (explicit teardown:
DeepEP's destructor can hang during interpreter shutdown); `trainer.parallel.teardown()` closes every dispatcher.
"""

from __future__ import annotations

import atexit
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.parallel.alltoall import AllToAllDispatcher
from trainer.parallel.expert_rows import ExpertRows, RowsPlanMixin, expand_to_rows, plan_expert_rows, reduce_rows
from trainer.moe.z_loss import in_backward

_OPEN: weakref.WeakSet = weakref.WeakSet()


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, weights_TK, index_TK, layout, buffer, out: dict):
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank = layout
        recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
            x_TD, topk_idx=index_TK, topk_weights=weights_TK, num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert,
        )
        ctx.buffer, ctx.handle, ctx.top_k = buffer, handle, index_TK.shape[1]
        out["handle"], out["counts"] = handle, counts  # non-tensor results travel beside the autograd outputs
        ctx.mark_non_differentiable(recv_idx)
        return recv_x, recv_w, recv_idx

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_w, _grad_idx):
        if grad_recv_w is None:
            grad_recv_w = torch.zeros(grad_recv_x.shape[0], ctx.top_k, device=grad_recv_x.device)
        grad_x, grad_w, _ = ctx.buffer.combine(grad_recv_x.contiguous(), ctx.handle, topk_weights=grad_recv_w.float())
        return grad_x, grad_w, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial_RD, handle, buffer):
        ctx.buffer, ctx.handle = buffer, handle
        combined_TD, _, _ = buffer.combine(partial_RD.contiguous(), handle)
        return combined_TD

    @staticmethod
    def backward(ctx, grad_TD):
        grad_partial, _, _, _, _, _ = ctx.buffer.dispatch(grad_TD.contiguous(), handle=ctx.handle)
        return grad_partial, None, None


@dataclass
class DeepEPPlan(RowsPlanMixin):
    rows: ExpertRows
    handle: tuple
    recv_weights_RK: torch.Tensor


class DeepEPDispatcher:
    """One DeepEP `Buffer` per EP group, shared by all MoE layers; `for_layer(i)` gives each layer its own
    layout cache for activation-checkpoint replay."""

    name = "deepep"
    weights_at_dispatch = True

    def __init__(self, group: dist.ProcessGroup, hidden_size: int | None = None):
        import deep_ep

        self._deep_ep = deep_ep
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self._buffer = None
        self._hidden_bytes = 0
        self._fallback = AllToAllDispatcher(group)
        self._layouts: dict[int, tuple] = {}
        if hidden_size:
            self._ensure_buffer(hidden_size * 2)
        _OPEN.add(self)

    def _ensure_buffer(self, hidden_bytes: int):
        if self._buffer is not None and hidden_bytes <= self._hidden_bytes:
            return self._buffer
        Buffer = self._deep_ep.Buffer
        nvl_bytes, rdma_bytes = 0, 0
        for config in (Buffer.get_dispatch_config(self.ep_size), Buffer.get_combine_config(self.ep_size)):
            nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, self.ep_size), nvl_bytes)
            rdma_bytes = max(config.get_rdma_buffer_size_hint(hidden_bytes, self.ep_size), rdma_bytes)
        self.close()
        self._buffer = Buffer(self.group, nvl_bytes, rdma_bytes, explicitly_destroy=True)
        self._hidden_bytes = hidden_bytes
        return self._buffer

    def for_layer(self, layer: int) -> _LayerView:
        return _LayerView(self, layer)

    def dispatch(self, x_TD, top_k_index_TK, num_experts, top_k_weights_TK=None, layer: int = -1):
        """[T, D] bf16 tokens, [T, K] global ids and weights -> ([S, D] rows grouped by local expert, plan)."""
        if x_TD.dtype != torch.bfloat16:
            return self._fallback.dispatch(x_TD, top_k_index_TK, num_experts, top_k_weights_TK)
        buffer = self._ensure_buffer(x_TD.shape[1] * max(x_TD.element_size(), 2))
        layout = self._layouts.get(layer) if in_backward() else None
        if layout is None or layout[3].shape[0] != x_TD.shape[0]:
            tokens_per_rank, tokens_per_rdma_rank, tokens_per_expert, in_rank, _ = buffer.get_dispatch_layout(
                top_k_index_TK, num_experts)
            layout = (tokens_per_rank, tokens_per_rdma_rank, tokens_per_expert, in_rank)
            self._layouts[layer] = layout
        out: dict = {}
        recv_x, recv_w, recv_idx = _Dispatch.apply(
            x_TD.contiguous(), top_k_weights_TK.float().contiguous(), top_k_index_TK.contiguous(), layout, buffer, out)
        rows = plan_expert_rows(recv_idx, num_experts // self.ep_size, int(sum(out["counts"])))
        return expand_to_rows(recv_x, rows), DeepEPPlan(rows, out["handle"], recv_w)

    def combine(self, y_SD, top_k_weights_TK, plan):
        """[S, D] expert outputs -> [T, D] in the caller's token order (weights applied on the expert side)."""
        if not isinstance(plan, DeepEPPlan):
            return self._fallback.combine(y_SD, top_k_weights_TK, plan)
        partial_RD = reduce_rows(y_SD, plan.recv_weights_RK, plan.rows)
        return _Combine.apply(partial_RD.to(torch.bfloat16), plan.handle, self._buffer)

    def close(self) -> None:
        """Release the DeepEP buffer (collective over the EP group: call on every rank)."""
        if self._buffer is not None:
            self._buffer.destroy()
            self._buffer = None


class _LayerView:
    """The shared dispatcher seen from one MoE layer (its own replay slot)."""

    name = DeepEPDispatcher.name
    weights_at_dispatch = True

    def __init__(self, shared: DeepEPDispatcher, layer: int):
        self.shared, self.layer = shared, layer

    def dispatch(self, x_TD, top_k_index_TK, num_experts, top_k_weights_TK=None):
        return self.shared.dispatch(x_TD, top_k_index_TK, num_experts, top_k_weights_TK, layer=self.layer)

    def combine(self, y_SD, top_k_weights_TK, plan):
        return self.shared.combine(y_SD, top_k_weights_TK, plan)


def close_all() -> None:
    """Tear down every open DeepEP buffer of this process."""
    for dispatcher in list(_OPEN):
        dispatcher.close()


atexit.register(close_all)
