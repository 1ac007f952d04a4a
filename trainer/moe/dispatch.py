"""The dispatcher interface: move routed tokens to the experts that own them and bring the results back.

    rows, plan = dispatcher.dispatch(x_TD, top_k_index_TK, num_experts)
    y_rows     = expert_mlp(rows, plan.offsets_E)             # grouped GEMMs over the local experts
    y_TD       = dispatcher.combine(y_rows, top_k_weights_TK, plan)

`LocalDispatcher` (no expert parallelism) only permutes. The expert-parallel implementations (all-to-all, DeepEP)
live in `trainer/parallel/` and follow the same two methods; the experts forward never knows which one it has.
They set `weights_at_dispatch = True`: each token travels once per destination rank and the expert side applies the
routing weights before sending one row per (token, rank) back, so they take `top_k_weights_TK` at dispatch.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from trainer.moe.permute import RoutingPlan, make_plan, permute_tokens, unpermute_and_combine


class Dispatcher(Protocol):
    """What the experts forward needs from a dispatcher."""

    def dispatch(self, x_TD: torch.Tensor, top_k_index_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, Any]:
        """Returns rows for this rank's experts grouped by local expert, and a plan with `offsets_E` (int32)."""
        ...

    def combine(self, y_SD: torch.Tensor, top_k_weights_TK: torch.Tensor, plan: Any) -> torch.Tensor:
        """Returns [T, D]: each token's expert outputs weighted and summed, in the caller's token order."""
        ...


class LocalDispatcher:
    """All experts live on this rank: dispatch is a sort by expert, combine its inverse plus the weighted sum."""

    def dispatch(self, x_TD: torch.Tensor, top_k_index_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, RoutingPlan]:
        plan = make_plan(top_k_index_TK, num_experts)
        return permute_tokens(x_TD, plan), plan

    def combine(self, y_SD: torch.Tensor, top_k_weights_TK: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        return unpermute_and_combine(y_SD, top_k_weights_TK, plan)


LOCAL_DISPATCHER = LocalDispatcher()
