"""LoRA parity (CPU, fp32): the fast path (adapters on the permuted rows of the grouped expert MLP) against PEFT's
own reference (the dense W + scaling * B A per expert, on plain transformers) on the same weights: logits, loss and
every adapter gradient within 1e-5; base weights bit-identical after training steps."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from parity_checks import TOLERANCE, relative
from tiny_configs import nemotron_h, qwen3_moe
from trainer.config import LoraConfig
from trainer.lora import apply_lora
from trainer.lora.experts import adapters_of
from trainer.models import MoEAutoModelForCausalLM

CASES = {
    "qwen3_moe": (qwen3_moe, ["attention", "experts"]),
    "nemotron_h": (nemotron_h, ["attention", "experts", "shared_experts", "mamba"]),
}


def _pair(family: str, rank: int = 4):
    """(fast model with LoRA, plain transformers model with PEFT's LoRA), same base and adapter weights; B made
    non-zero (PEFT starts it at zero, which would hide a wrong B)."""
    make_config, targets = CASES[family]
    torch.manual_seed(0)
    fast = MoEAutoModelForCausalLM.from_config(make_config(), dtype=torch.float32)
    reference = AutoModelForCausalLM.from_config(make_config(), dtype=torch.float32)
    reference.load_state_dict(fast.state_dict())
    cfg = LoraConfig(enabled=True, rank=rank, alpha=2.0 * rank, targets=targets)
    apply_lora(fast, cfg)
    apply_lora(reference, cfg, config=fast.__dict__["moe_lora_config"])
    with torch.no_grad():
        for name, param in fast.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.05)
    reference.load_state_dict(fast.state_dict())
    return fast, reference


def _batch(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 96, (2, 24), generator=generator)
    return {"input_ids": input_ids, "labels": input_ids}


@pytest.mark.parametrize("family", sorted(CASES))
def test_forward_and_backward_match_peft_reference(family):
    fast, reference = _pair(family)
    assert any(adapters_of(m) for m in fast.modules()), "the fast model's experts must take the row path"
    assert not any(adapters_of(m) for m in reference.modules())
    batch = _batch()
    fast_out, ref_out = fast(**batch), reference(**batch)
    assert (fast_out.logits - ref_out.logits).abs().max().item() <= TOLERANCE
    assert abs(fast_out.loss.item() - ref_out.loss.item()) <= TOLERANCE * abs(ref_out.loss.item())
    fast_out.loss.backward()
    ref_out.loss.backward()
    ref_params = dict(reference.named_parameters())
    compared = 0
    for name, param in fast.named_parameters():
        if not param.requires_grad:
            assert param.grad is None, f"{name} is frozen and must get no gradient"
            continue
        assert ".lora_" in name
        assert relative(param.grad, ref_params[name].grad) <= TOLERANCE, name
        compared += 1
    expert_grads = [n for n, _ in fast.named_parameters() if "experts." in n and ".lora_" in n]
    assert compared > 0 and expert_grads


def test_only_adapters_train_and_base_weights_stay_bit_identical():
    fast, _ = _pair("qwen3_moe")
    base_before = {n: p.detach().clone() for n, p in fast.named_parameters() if not p.requires_grad}
    trainable = [p for p in fast.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    adapters_before = [p.detach().clone() for p in trainable]
    for seed in range(3):
        fast(**_batch(seed)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in fast.named_parameters():
        if name in base_before:
            assert torch.equal(param, base_before[name]), name
    assert any(not torch.equal(p, q) for p, q in zip(trainable, adapters_before))


@pytest.mark.parametrize("family", sorted(CASES))
def test_fused_expert_mlp_with_adapters_matches_peft_reference(family):
    """`perf.fused_experts`: the memory-lean expert MLP (custom op, explicit backward) with the adapter terms."""
    from trainer.moe.experts import set_fused_experts

    fast, reference = _pair(family)
    assert set_fused_experts(fast) > 0
    batch = _batch()
    fast_out, ref_out = fast(**batch), reference(**batch)
    assert (fast_out.logits - ref_out.logits).abs().max().item() <= TOLERANCE
    fast_out.loss.backward()
    ref_out.loss.backward()
    ref_params = dict(reference.named_parameters())
    for name, param in fast.named_parameters():
        if param.requires_grad:
            assert relative(param.grad, ref_params[name].grad) <= TOLERANCE, name
        else:
            assert param.grad is None, name
