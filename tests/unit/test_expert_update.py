"""The experts' AdamW update inside their backward (`fused_update`, trainer.kernels.expert_update), on the CPU path
(grouped weight-gradient GEMM + torch._fused_adamw_; the fused Triton kernel is tested on a GPU).

Tolerances: fp32; the weight-gradient + AdamW reference matches torch.optim.AdamW on per-expert gradients within
1e-6 relative; whole training steps with and without the fused update reach the same parameters within 1e-5
relative (summation order only).
"""

from __future__ import annotations

import pytest
import torch

import tiny_configs
from trainer.kernels.expert_update import ExpertUpdate, weight_grad_adamw_
from trainer.models import MoEAutoModelForCausalLM
from trainer.perf import PerfOptions, apply_optimizations, causal_lm_loss
from trainer.step_optimizer import build_optimizer

IDS = torch.randint(0, tiny_configs.VOCAB, (2, 24), generator=torch.Generator().manual_seed(5))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_weight_gradient_update_is_adamw_on_each_experts_gradient():
    torch.manual_seed(0)
    counts = [5, 0, 9]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    a, b = torch.randn(14, 6), torch.randn(14, 4)
    weight = torch.randn(3, 6, 4)
    reference = weight.clone().requires_grad_()
    optimizer = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    states = torch.zeros_like(weight), torch.zeros_like(weight)
    update = ExpertUpdate({}, torch.ones(()), 1e-2, 0.9, 0.95, 1e-8, 0.1)
    for _ in range(3):
        weight_grad_adamw_(a, b, offsets, weight, *states, update)
        update.step += 1
        grad, start = torch.zeros_like(weight), 0
        for expert, count in enumerate(counts):
            grad[expert] = a[start:start + count].t() @ b[start:start + count]
            start += count
        reference.grad = grad
        optimizer.step()
    assert _relative(weight, reference.detach()) <= 1e-6


def _model(family: str = "qwen3_moe"):
    torch.manual_seed(0)
    config = (tiny_configs.nemotron_h() if family == "nemotron_h"
              else tiny_configs.qwen3_moe(output_router_logits=True, router_aux_loss_coef=0.01))
    model = MoEAutoModelForCausalLM.from_config(config)
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


def _train(spec: str, steps: int = 3, family: str = "qwen3_moe"):
    model = _model(family)
    options = PerfOptions.parse(spec)
    apply_optimizations(model, options)
    optimizer = build_optimizer(model, options, lr=1e-2)
    for _ in range(steps):
        causal_lm_loss(model, IDS, IDS, options).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, options


@pytest.mark.parametrize("optimizer, family", [("opt-in-bwd", "qwen3_moe"), ("opt-overlap", "qwen3_moe"),
                                               ("opt-in-bwd", "nemotron_h")])
def test_training_with_the_update_in_the_experts_backward_equals_the_hooks(optimizer, family):
    reference, _ = _train(f"fused-experts+{optimizer}", family=family)
    model, options = _train(f"fused-experts+{optimizer}+fused-update", family=family)
    assert any("updated inside their backward on 2 MoE layers" in note for note in options.notes), options.notes
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        assert _relative(b.detach(), a.detach()) <= 1e-5, name


def test_expert_weights_never_get_a_gradient():
    model = _model()
    options = PerfOptions.parse("fused-experts+opt-in-bwd+fused-update")
    apply_optimizations(model, options)
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    with_gradient = []
    for p in model.parameters():  # before the optimizer's hooks, which free each gradient
        p.register_post_accumulate_grad_hook(lambda p: with_gradient.append(p) if p.grad is not None else None)
    build_optimizer(model, options, lr=1e-2)
    causal_lm_loss(model, IDS, IDS, options).loss.backward()
    experts = model.model.layers[0].mlp.experts
    assert not any(p is experts.gate_up_proj or p is experts.down_proj for p in with_gradient)
    assert any(p is model.lm_head.weight for p in with_gradient)
    assert experts.gate_up_proj.grad is None and not torch.equal(experts.gate_up_proj.detach(), before)


@pytest.mark.parametrize("spec, reason", [
    ("fused-experts+fused-update", "needs an in-backward optimizer"),
    ("fused-experts+opt-in-bwd+master-fp32+fused-update", "not an fp32 master copy"),
    ("opt-in-bwd+fused-update", "needs fused_experts"),
])
def test_fused_update_falls_back_with_a_note(spec, reason):
    model = _model()
    options = PerfOptions.parse(spec)
    apply_optimizations(model, options)
    build_optimizer(model, options, lr=1e-2)
    assert any(reason in note for note in options.notes), options.notes
    assert "moe_expert_update" not in model.model.layers[0].mlp.experts.__dict__


def test_compiled_layers_with_the_update_are_one_graph_and_train_like_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    reference, _ = _train("fused-experts+opt-in-bwd+fused-update")
    model, _ = _train("fused-experts+opt-in-bwd+fused-update+compile-all")
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] >= 1
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        assert _relative(b.detach(), a.detach()) <= 1e-5, name
