"""The shipped Nemotron 3 Nano config builds the published model, and the recipe preset points at it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import tiny_configs
from trainer.config import load_recipe
from trainer.errors import UserError
from trainer.models import MoEAutoModelForCausalLM, resolve_adapter
from trainer.models.nemotron_h import aux_free_balancer, published_config_dict

ASSET = Path(__file__).resolve().parents[2] / "trainer" / "assets" / "model-configs" / "nemotron-3-nano-30b-a3b.json"


@pytest.fixture(scope="module")
def nano():
    config = AutoConfig.from_pretrained(str(ASSET))
    with torch.device("meta"):
        return MoEAutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def test_published_config_builds_52_layers_23_mamba_23_moe_6_attention(nano):
    assert nano.config.hybrid_override_pattern == "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
    kinds = Counter(type(layer.mixer).__name__ for layer in nano.model.layers)
    assert kinds == {"NemotronHMamba2Mixer": 23, "NemotronHMoE": 23, "NemotronHAttention": 6}


def test_published_config_gives_the_published_shapes(nano):
    moe, attention, mamba = nano.model.layers[1].mixer, nano.model.layers[5].mixer, nano.model.layers[0].mixer
    assert moe.experts.up_proj.shape == (128, 1856, 2688) and moe.experts.down_proj.shape == (128, 2688, 1856)
    assert moe.shared_experts.up_proj.weight.shape == (3712, 2688)
    assert moe.gate.weight.shape == (128, 2688) and moe.gate.moe_router_spec.top_k == 6
    assert moe.gate.moe_router_spec.routed_scaling_factor == 2.5
    assert attention.q_proj.weight.shape == (32 * 128, 2688) and attention.k_proj.weight.shape == (2 * 128, 2688)
    # in_proj: gate (64*64) + conv channels (64*64 + 2*8*128) + dt (64 heads)
    assert mamba.in_proj.weight.shape == (4096 + 4096 + 2048 + 64, 2688)
    assert nano.lm_head.weight.shape == (131072, 2688)
    total = sum(p.numel() for p in nano.parameters())
    assert 31.5e9 < total < 31.7e9  # "31.6B total, ~3.2B active" as published


def test_exported_config_reproduces_every_published_field(nano):
    published = json.loads(ASSET.read_text())
    exported = published_config_dict(nano.config)
    assert {key: exported.get(key) for key in published} == published


def test_recipe_preset_fine_tunes_the_published_checkpoint_with_ep8():
    recipe = load_recipe("nemotron-3-nano")
    assert recipe.model.name_or_path == "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
    assert recipe.parallel.ep_size == 8
    assert not recipe.model.trust_remote_code  # transformers 5 has the family built in


def test_mamba_heads_must_split_into_groups():
    with pytest.raises(UserError, match="mamba_num_heads=4 is not a multiple of n_groups=3"):
        resolve_adapter(tiny_configs.nemotron_h(n_groups=3))


def test_aux_free_balancer_moves_the_correction_bias_towards_balance():
    torch.manual_seed(0)
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.nemotron_h())
    balancer = aux_free_balancer(model, rate=0.01)
    assert len(balancer.routers) == 2
    model(torch.randint(0, tiny_configs.VOCAB, (2, 16)))
    balancer.step()
    for router in balancer.routers:
        bias = router.e_score_correction_bias
        assert bias.dtype == torch.float32 and bias.abs().max().item() == pytest.approx(0.01)
    balancer.remove()


def test_config_overrides_of_derived_nemotron_fields_apply_or_are_refused_in_one_line():
    """`hybrid_override_pattern` is a property computed from the layer list (setting it raised AttributeError) and
    `num_hidden_layers` has a setter that ignores the value: both go through the stored layer list instead."""
    from trainer.models.config_overrides import apply_config_overrides

    config = tiny_configs.nemotron_h()  # ME*-EM
    shorter = apply_config_overrides(config, {"hybrid_override_pattern": "ME*"})
    assert shorter.layers_block_type == ["linear_attention", "moe", "full_attention"]
    assert apply_config_overrides(config, {"num_hidden_layers": 4}).hybrid_override_pattern == "ME*-"
    assert config.hybrid_override_pattern == "ME*-EM"  # the loaded config is left as it was
    with pytest.raises(UserError, match=r"num_hidden_layers=9 has no effect on NemotronHConfig .* stays 6"):
        apply_config_overrides(config, {"num_hidden_layers": 9})
    with pytest.raises(UserError, match=r"do not make a valid NemotronHConfig"):
        apply_config_overrides(config, {"hybrid_override_pattern": "MX"})
