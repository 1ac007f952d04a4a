"""Adapters for the families with a fused router: Qwen3-MoE, Mixtral, DeepSeek-V3, plus the generic path.

The generic adapter covers any HF v5 model whose experts use `@use_experts_implementation` (Qwen2-MoE, OLMoE,
GLM4-MoE, ...): experts run through `moe_fast`, the router stays HF's own.
"""

from __future__ import annotations

from trainer.checkpoint.key_tables import MIXTRAL, QWEN2_STYLE, key_table_for
from trainer.models.base import FamilyAdapter
from trainer.moe.router import RouterSpec


class Qwen3MoeAdapter(FamilyAdapter):
    def router_spec(self, config) -> RouterSpec:
        return RouterSpec(
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            score_func="softmax",
            norm_topk_prob=bool(config.norm_topk_prob),
        )


class MixtralAdapter(FamilyAdapter):
    def router_spec(self, config) -> RouterSpec:
        return RouterSpec(
            num_experts=config.num_local_experts, top_k=config.num_experts_per_tok, score_func="softmax"
        )


class SigmoidGroupRouterAdapter(FamilyAdapter):
    """DeepSeek-V3-style routing: sigmoid scores, score-correction bias, group-limited top-k, routed scaling."""

    def router_spec(self, config) -> RouterSpec:
        return RouterSpec(
            num_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            score_func="sigmoid",
            norm_topk_prob=bool(config.norm_topk_prob),
            n_group=config.n_group or 1,
            topk_group=config.topk_group or 1,
            routed_scaling_factor=float(config.routed_scaling_factor),
            norm_eps=1e-20,
            logits_in_fp32=True,
        )


QWEN3_MOE = Qwen3MoeAdapter("qwen3_moe", ("qwen3_moe",), QWEN2_STYLE, ("Qwen3MoeTopKRouter",))
MIXTRAL_ADAPTER = MixtralAdapter("mixtral", ("mixtral",), MIXTRAL, ("MixtralTopKRouter",))
DEEPSEEK_V3 = SigmoidGroupRouterAdapter("deepseek_v3", ("deepseek_v3",), QWEN2_STYLE, ("DeepseekV3TopkRouter",))


def generic_adapter(model_type: str) -> FamilyAdapter:
    """Experts through `moe_fast`, HF's router; key table from transformers' own family grouping (may be None)."""
    return FamilyAdapter(name=f"generic:{model_type}", model_types=(model_type,), key_table=key_table_for(model_type))
