"""Seeded experts modules of three HF families, weights drawn with std 0.3 (the unit tests' shared builders):
Qwen3-MoE (SwiGLU), Nemotron-H (relu^2 without gate), gpt-oss (biased, custom gate, transposed layout)."""

from __future__ import annotations

import torch
from transformers import GptOssConfig, NemotronHConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

import tiny_configs
from trainer.models import MoEAutoModelForCausalLM
from trainer.moe.experts import register_fast_experts


def _init(experts: torch.nn.Module) -> torch.nn.Module:
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return experts


def qwen3_experts() -> torch.nn.Module:
    torch.manual_seed(0)
    return _init(MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe()).model.layers[0].mlp.experts)


def nemotron_experts() -> torch.nn.Module:
    torch.manual_seed(0)
    config = NemotronHConfig(vocab_size=64, hidden_size=32, n_routed_experts=6, num_experts_per_tok=2,
                             moe_intermediate_size=16, moe_shared_expert_intermediate_size=16,
                             layers_block_type=["moe"], mlp_hidden_act="relu2")
    config._experts_implementation = register_fast_experts()
    return _init(NemotronHExperts(config))


def gpt_oss_experts() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_local_experts=6,
                          num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=16)
    config._experts_implementation = register_fast_experts()
    return _init(GptOssExperts(config))
