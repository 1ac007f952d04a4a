"""trainer.parallel.checkpointing (`parallel.activation_checkpointing`): each mode recomputes what its name says, on
Llama-style layers (Qwen3-MoE) and on Nemotron-H's one-mixer layers, and changes no loss or gradient.

`attention` recomputes attention only, never a Mamba2 mixer (Nemotron-H calls its Mamba2 layers "linear_attention"):
the planner prices it so, and a Mamba2 mixer costs far more to recompute per byte saved. Tolerance: 1e-5 relative on
the loss and every gradient in fp32 (a recomputed forward repeats the same arithmetic).
"""

from __future__ import annotations

import re

import pytest
import torch

import tiny_configs
from trainer.loss import forward_loss_sum
from trainer.models import MoEAutoModelForCausalLM
from trainer.parallel.checkpointing import apply_checkpointing, decoder_layers, sub_blocks
from training_loop import micro_batch

IDS = torch.randint(0, tiny_configs.VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_configs.nemotron_h() if family == "nemotron_h" else tiny_configs.qwen3_moe()
    return MoEAutoModelForCausalLM.from_config(config)


def _kinds(model: torch.nn.Module, mode: str) -> list[list[str]]:
    return [[type(s).__name__ for s in sub_blocks(layer, mode)] for layer in decoder_layers(model)]


def test_nemotron_h_attention_mode_takes_the_attention_layer_only_and_moe_mode_the_moe_layers():
    model = _model("nemotron_h")  # layers: mamba, moe, attention, mlp, moe, mamba
    assert _kinds(model, "attention") == [[], [], ["NemotronHAttention"], [], [], []]
    assert _kinds(model, "moe") == [[], ["NemotronHMoE"], [], [], ["NemotronHMoE"], []]
    assert apply_checkpointing(model, "attention") == "activation checkpointing: 1 attention sub-blocks"


def test_llama_style_layers_give_their_attention_and_moe_blocks():
    model = _model("qwen3_moe")
    assert _kinds(model, "attention") == [["Qwen3MoeAttention"]] * 2
    assert _kinds(model, "moe") == [["Qwen3MoeSparseMoeBlock"]] * 2


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match=re.escape("choose one of none|full|attention|moe")):
        apply_checkpointing(_model("qwen3_moe"), "selective")


def _loss_and_grads(model: torch.nn.Module):
    loss, _ = forward_loss_sum(model, micro_batch(IDS))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["full", "attention", "moe"])
@pytest.mark.parametrize("family", ["qwen3_moe", "nemotron_h"])
def test_checkpointing_changes_no_loss_or_gradient(family, mode):
    reference_loss, reference_grads = _loss_and_grads(_model(family))
    model = _model(family)
    apply_checkpointing(model, mode)
    loss, grads = _loss_and_grads(model)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=0)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-7, msg=name)
