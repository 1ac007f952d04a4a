"""Expert parallelism with static shapes: every rank sees every token of its EP group, computes its own experts'
share, and the partial outputs are summed back home.

    x_all   = all_gather(x_TD)                 [W*T, D]   (with the routing ids and weights, [W*T, K] each)
    ids     = global id - r*E/W; pairs whose expert lives elsewhere are not kept (they sort past the last offset)
    out_all = this rank's expert MLP on the kept pairs, weighted and summed per token      [W*T, D]
    out_TD  = reduce_scatter(out_all, sum)      [T, D]

Every shape depends only on T, so nothing waits on the host: a decoder layer compiles as one graph, collectives
included (torch's functional collectives), and can be replayed as a CUDA graph. The all-to-all and DeepEP
dispatchers cannot: they size their buffers from counts read back to the host.

The price is that every token goes to every rank: (W-1)/W of T*D sent per direction, against the all-to-all's
share of tokens with an expert on each other rank. With top-8 of 128 experts that share is > 99% at W=2 and ~66%
at W=8, so this dispatcher suits small EP groups inside a node and the all-to-all larger ones. Only the kept pairs
are computed; the row buffers are sized for all W*T*K pairs (the grouped GEMMs skip the rest).

Backward mirrors it: the reduce-scatter's backward all-gathers the output gradient, the all-gather's backward
reduce-scatters (sums) the token gradients. Sums over ranks run in NCCL's (gloo's) fixed reduction order, in the
output dtype: for bf16 training one rounding of the two partials at W=2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


@dataclass
class GatheredTokens:
    """The EP group's tokens as this rank's experts see them. N = W*T tokens, K = top-k.

    x_ND: the tokens; local_index_NK: local expert ids (`num_local_experts` where the expert is elsewhere);
    weights_NK: routing weights (0 where not kept); keep_NK: which pairs this rank computes.
    """

    x_ND: torch.Tensor
    local_index_NK: torch.Tensor
    weights_NK: torch.Tensor
    keep_NK: torch.Tensor
    num_local_experts: int


class AllGatherDispatcher:
    """Expert parallelism over `group`; rank r holds experts [r*E/W, (r+1)*E/W). Static shapes, no host sync."""

    name = "allgather"
    gathers_tokens = True  # the experts forward runs the local expert MLP between gather() and scatter()
    static_shapes = True  # no host synchronisation: the layers can be compiled whole and captured as CUDA graphs

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def gather(self, x_TD: torch.Tensor, top_k_index_TK: torch.Tensor, top_k_weights_TK: torch.Tensor,
               num_experts: int) -> GatheredTokens:
        """Every rank's tokens and routing, in rank order, with ids made local to this rank."""
        top_k = top_k_index_TK.shape[1]
        experts_per_rank = num_experts // self.ep_size
        x_ND = funcol.all_gather_tensor_autograd(x_TD.contiguous(), 0, self.group)
        # ids travel as fp32 beside the weights (exact below 2**24 experts): one collective for both
        meta_TK2 = torch.cat([top_k_weights_TK.float(), top_k_index_TK.float()], dim=1)
        meta_NK2 = funcol.all_gather_tensor_autograd(meta_TK2, 0, self.group)
        local_NK = meta_NK2[:, top_k:].detach().long() - self.rank * experts_per_rank
        keep_NK = (local_NK >= 0) & (local_NK < experts_per_rank)
        return GatheredTokens(
            x_ND=x_ND,
            local_index_NK=torch.where(keep_NK, local_NK, experts_per_rank),
            weights_NK=torch.where(keep_NK, meta_NK2[:, :top_k], 0.0).to(top_k_weights_TK.dtype),
            keep_NK=keep_NK,
            num_local_experts=experts_per_rank,
        )

    def scatter(self, out_ND: torch.Tensor) -> torch.Tensor:
        """[W*T, D] partial outputs (this rank's experts) -> [T, D] summed over the group, this rank's tokens."""
        return funcol.reduce_scatter_tensor_autograd(out_ND.contiguous(), "sum", 0, self.group)
