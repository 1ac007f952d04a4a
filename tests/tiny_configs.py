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


# ---- the other families the library path accepts (each trains through `moe train`, tests/unit/test_families.py) --

def gpt_oss(**overrides):
    """Attention sinks (transformers has no sdpa path for them), alternating sliding / full attention."""
    from transformers import GptOssConfig

    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                  layer_types=["sliding_attention", "full_attention"], sliding_window=16, max_position_embeddings=128)
    kwargs.update(overrides)
    return GptOssConfig(**kwargs)


def jamba(**overrides):
    """Mamba1 and attention mixers, an MoE in every other layer (`layers_num_experts`)."""
    from transformers import JambaConfig

    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
                  attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_d_conv=4,
                  mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False, max_position_embeddings=128)
    kwargs.update(overrides)
    return JambaConfig(**kwargs)


def granitemoehybrid(**overrides):
    """Mamba2 and attention mixers, each followed by an MoE with a shared expert."""
    from transformers import GraniteMoeHybridConfig

    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=24,
                  layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
                  mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, max_position_embeddings=128)
    kwargs.update(overrides)
    return GraniteMoeHybridConfig(**kwargs)


def _text(vocab_size: int = VOCAB) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                num_hidden_layers=2, max_position_embeddings=128)


def qwen3_5_moe(vocab_size: int = VOCAB):
    """Multimodal: the MoE fields live under text_config (gated delta-net and full attention layers)."""
    from transformers import Qwen3_5MoeConfig

    return Qwen3_5MoeConfig(text_config=dict(
        **_text(vocab_size), moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8))


def llama4(vocab_size: int = VOCAB):
    """Multimodal, MoE under text_config; its experts do not use the experts interface (plain transformers path)."""
    from transformers import Llama4Config

    return Llama4Config(text_config=dict(
        **_text(vocab_size), intermediate_size=16, intermediate_size_mlp=24, num_local_experts=4,
        num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layers=[1, 1]))
