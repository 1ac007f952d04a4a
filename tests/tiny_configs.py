"""Tiny random-init configs of real families, shared by the tests (float32, CPU, a few ms per forward)."""

from __future__ import annotations

from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig

VOCAB = 96


def qwen3_moe(**overrides) -> Qwen3MoeConfig:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=128, norm_topk_prob=True, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return Qwen3MoeConfig(**kwargs)


def mixtral(**overrides) -> MixtralConfig:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=128,
    )
    kwargs.update(overrides)
    return MixtralConfig(**kwargs)


def deepseek_v3(**overrides) -> DeepseekV3Config:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
        topk_group=2, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        max_position_embeddings=128, rope_interleave=True,
    )
    kwargs.update(overrides)
    return DeepseekV3Config(**kwargs)


def qwen2_moe(**overrides) -> Qwen2MoeConfig:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    kwargs.update(overrides)
    return Qwen2MoeConfig(**kwargs)


def olmoe(**overrides) -> OlmoeConfig:
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=128,
    )
    kwargs.update(overrides)
    return OlmoeConfig(**kwargs)


FAMILIES = {"qwen3_moe": qwen3_moe, "mixtral": mixtral, "deepseek_v3": deepseek_v3, "qwen2_moe": qwen2_moe, "olmoe": olmoe}


def nemotron_h(**overrides):
    """Every Nemotron-H layer type: Mamba2 (M), MoE (E), attention (*), dense relu2 MLP (-). chunk_size 8 so a
    24-token row spans three SSD chunks."""
    from transformers import NemotronHConfig

    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, layers_block_type=["mamba", "moe", "attention", "mlp", "moe", "mamba"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4,
        mamba_head_dim=8, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=24,
        routed_scaling_factor=2.5, n_group=1, topk_group=1, norm_topk_prob=True, max_position_embeddings=128,
        use_cache=False, tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return NemotronHConfig(**kwargs)
