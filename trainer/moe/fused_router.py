"""Replace a HF router module's forward with the fused router, keeping its parameters and its outputs.

HF records router logits for the load-balancing aux loss by hooking the router *class*, so the module stays the
same object; only its `forward` is swapped for `route()` with the family's `RouterSpec`. The outputs keep HF's
contract: `(router_logits [T, E], top_k_weights [T, K], top_k_index [T, K])`.
"""

from __future__ import annotations

import types

import torch

from trainer.moe.router import RouterSpec, route, router_logits


def _fused_forward(self: torch.nn.Module, hidden_states: torch.Tensor):
    spec: RouterSpec = self.moe_router_spec
    x_TD = hidden_states.reshape(-1, hidden_states.shape[-1])
    logits_TE = router_logits(x_TD, self.weight, spec)
    bias_E = getattr(self, "e_score_correction_bias", None)
    weights_TK, index_TK = route(logits_TE, spec, bias_E)
    return logits_TE, weights_TK, index_TK


def install_fused_router(router: torch.nn.Module, spec: RouterSpec) -> None:
    """Swap `router.forward` for the fused router (idempotent)."""
    router.moe_router_spec = spec
    router.forward = types.MethodType(_fused_forward, router)
