"""Top-k routing: scores in fp32, expert choice, weight normalisation.

One function covers the routers of the supported families:
- softmax scoring, top-k, optional renormalisation (Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE);
- sigmoid scoring with `e_score_correction_bias` used only for the choice, group-limited top-k
  (`n_group` / `topk_group`), renormalisation and `routed_scaling_factor` (DeepSeek-V3, Nemotron-H).
The arithmetic follows the transformers reference routers operation for operation, so that float32 results match
bit for bit; `torch.compile` fuses it into a few kernels on GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RouterSpec:
    """How a family scores and picks experts. Built from a HF config by the family adapter."""

    num_experts: int
    top_k: int
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_eps: float = 0.0  # DeepSeek/Nemotron add 1e-20 to the denominator; softmax routers add nothing
    logits_in_fp32: bool = False  # DeepSeek/Nemotron compute the router matmul itself in fp32


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """[T, D] x [E, D] -> [T, E] router logits (fp32 matmul for families whose reference does that)."""
    if spec.logits_in_fp32:
        return F.linear(x_TD.float(), weight_ED.float())
    return F.linear(x_TD, weight_ED)


def route(
    logits_TE: torch.Tensor, spec: RouterSpec, correction_bias_E: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick top-k experts per token.

    Args:
        logits_TE: router logits [T, E] (any float dtype; scored in fp32).
        spec: the family's routing rule.
        correction_bias_E: added to the scores for the choice only (aux-loss-free balancing), or None.
    Returns:
        (top_k_weights_TK fp32, top_k_index_TK int64).
    """
    if spec.score_func == "softmax":
        scores_TE = torch.softmax(logits_TE.float(), dim=-1)
    elif spec.score_func == "sigmoid":
        scores_TE = logits_TE.float().sigmoid()
    else:
        raise ValueError(f"unknown router score function {spec.score_func!r}")

    choice_TE = scores_TE if correction_bias_E is None else scores_TE + correction_bias_E
    if spec.n_group > 1 and spec.topk_group < spec.n_group:
        choice_TE = _mask_to_top_groups(choice_TE, spec)
    if correction_bias_E is None and spec.n_group <= 1:
        weights_TK, index_TK = torch.topk(scores_TE, spec.top_k, dim=-1)
    else:
        index_TK = torch.topk(choice_TE, spec.top_k, dim=-1, sorted=False)[1]
        weights_TK = scores_TE.gather(1, index_TK)

    if spec.norm_topk_prob:
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + spec.norm_eps)
    if spec.routed_scaling_factor != 1.0:
        weights_TK = weights_TK * spec.routed_scaling_factor
    return weights_TK, index_TK


def _mask_to_top_groups(choice_TE: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Keep only experts in the `topk_group` best groups (group score = sum of its two best experts)."""
    tokens = choice_TE.shape[0]
    grouped_TGe = choice_TE.view(tokens, spec.n_group, spec.num_experts // spec.n_group)
    group_scores_TG = grouped_TGe.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores_TG, k=spec.topk_group, dim=-1, sorted=False)[1]
    group_mask_TG = torch.zeros_like(group_scores_TG).scatter_(1, group_idx, 1)
    keep_TE = group_mask_TG.unsqueeze(-1).expand_as(grouped_TGe).reshape(tokens, spec.num_experts)
    return choice_TE.masked_fill(~keep_TE.bool(), float("-inf"))


def router_z_loss(logits: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers and tokens of logsumexp(router logits)^2 (ST-MoE z-loss), in fp32."""
    per_layer = [torch.logsumexp(layer_TE.float(), dim=-1).square().mean() for layer_TE in logits]
    return torch.stack(per_layer).mean()
