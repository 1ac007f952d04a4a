"""The planner with lora.enabled: the adapter count is PEFT's, the base costs its weights only."""

from __future__ import annotations

import pytest
import torch

import tiny_configs
from trainer.config import LoraConfig, load_recipe
from trainer.lora import apply_lora
from trainer.lora.plan import adapter_params
from trainer.models import MoEAutoModelForCausalLM
from trainer.planner.fit_check import request_from_recipe
from trainer.planner.memory import estimate_memory

GiB = 2**30


@pytest.mark.parametrize("family, targets", [("qwen3_moe", ["attention", "experts"]),
                                             ("nemotron_h", ["attention", "experts", "shared_experts", "mamba"])])
def test_adapter_count_from_the_config_equals_what_peft_creates(family, targets):
    config = getattr(tiny_configs, family)()
    lora = LoraConfig(enabled=True, rank=4, targets=targets)
    model = apply_lora(MoEAutoModelForCausalLM.from_config(config), lora)
    assert adapter_params(config, lora) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_preset_costs_the_frozen_base_and_fp32_adapter_state_only():
    request = request_from_recipe(load_recipe("qwen3-30b-a3b-lora"), world_size=1)
    adapters = request.options.adapter_params
    assert adapters == 642_514_944  # r=16 on attention + experts of the 48-layer model
    lora = estimate_memory(request.shape, request.layout, request.options)
    full = estimate_memory(request.shape, request.layout,
                           type(request.options)(**{**request.options.__dict__, "adapter_params": None}))
    n_params = sum(sum(request.shape.layer_params(layer)) for layer in request.shape.layers) + request.shape.root_params
    assert lora.components["params"] == pytest.approx(2 * n_params + 4 * adapters)
    assert lora.components["optimizer"] == pytest.approx(8 * adapters)
    assert lora.total < 80 * GiB < full.total
