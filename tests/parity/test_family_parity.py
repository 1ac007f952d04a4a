"""The fast MoE path computes the same function as the HF reference (eager experts, HF routers).

Tolerances (float32, CPU): logits max-abs-diff <= 1e-5; loss and every parameter gradient within 1e-5 relative
(||g_fast - g_ref|| / ||g_ref||). Differences come only from summation order (the K-way combine and the grouped
GEMM loop), which moves float32 results by ~1e-7.
"""

from __future__ import annotations

import copy

import pytest
import tiny_configs
import torch
from parity_checks import assert_same_function
from transformers import AutoModelForCausalLM

from trainer.models import MoEAutoModelForCausalLM

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "qwen2_moe", "olmoe"]


def _pair(config):
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), experts_implementation="eager")
    for name, param in reference.named_parameters():  # HF inits some router weights to zero: randomise everything
        if "norm" not in name:
            torch.nn.init.normal_(param, std=0.2)
    for name, buffer in reference.named_buffers():  # a non-zero score-correction bias changes the choice
        if name.endswith("e_score_correction_bias"):
            buffer.normal_(std=0.1)
    fast = MoEAutoModelForCausalLM.from_config(config)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _run(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, **kwargs)
    out.loss.backward()
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_loss_and_gradients_match_hf(family):
    reference, fast = _pair(tiny_configs.FAMILIES[family]())
    ids = torch.randint(0, tiny_configs.VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    ref_out, fast_out = _run(reference, ids), _run(fast, ids)
    assert len(assert_same_function(reference, fast, ref_out, fast_out)) > 10


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_aux_loss_equals_hf_when_enabled(family):
    config = tiny_configs.FAMILIES[family](output_router_logits=True, router_aux_loss_coef=0.01)
    reference, fast = _pair(config)
    ids = torch.randint(0, tiny_configs.VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    ref_out, fast_out = _run(reference, ids), _run(fast, ids)
    assert ref_out.aux_loss is not None
    assert torch.allclose(fast_out.aux_loss, ref_out.aux_loss, rtol=1e-6, atol=0)
    assert abs(fast_out.loss.item() - ref_out.loss.item()) <= 1e-5 * abs(ref_out.loss.item())


def test_fast_path_is_actually_used():
    _, fast = _pair(tiny_configs.qwen3_moe())
    assert fast.config._experts_implementation == "moe_fast"
    routers = [m for m in fast.modules() if type(m).__name__ == "Qwen3MoeTopKRouter"]
    assert routers and all(hasattr(r, "moe_router_spec") for r in routers)


def test_dense_model_loads_as_plain_hf_with_a_notice(capsys):
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    model = MoEAutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert "not a Mixture-of-Experts model" in capsys.readouterr().out
