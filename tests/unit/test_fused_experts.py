"""The fused expert MLP equals the unfused local path (dispatch -> expert_mlp -> combine) in value and gradients.

fp32 on CPU; tolerances: 1e-5 relative (only the summation order differs). Covers SwiGLU (Qwen3-MoE), relu^2
without gate (Nemotron-H), a custom gate through the generic autograd activation, experts that get no tokens,
and the grouped-GEMM weight-gradient form against a per-expert loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
import tiny_configs
from tiny_experts import nemotron_experts, qwen3_experts
from trainer.kernels.fused_expert_mlp import activation_for
from trainer.models import MoEAutoModelForCausalLM
from trainer.moe.experts import fast_experts_forward, set_fused_experts
from trainer.moe.grouped_gemm import grouped_mm_weight_grad


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _routing(tokens, experts, top_k, seed=1, skip=()):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(experts) if e not in skip])
    index = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:top_k]] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g, requires_grad=True)
    return index, weights


def _run(experts, fused: bool, x, index, weights):
    set_fused_experts(experts, fused)
    experts.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    w = weights.detach().requires_grad_(True)
    out = fast_experts_forward(experts, x, index, w)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    out.backward(grad)
    param_grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
    return out.detach(), x.grad, w.grad, param_grads, out.grad_fn


def _node_name(node) -> str:
    """node.name(); torch 2.7 raises RuntimeError (not AttributeError) on a custom Function's node for it."""
    try:
        return str(node.name())
    except (AttributeError, RuntimeError):
        return ""


def _next_functions(node) -> tuple:
    try:
        return node.next_functions
    except (AttributeError, RuntimeError):  # torch 2.7, as above
        return ()


def _graph_names(grad_fn, depth: int = 4) -> str:
    """The autograd node names reachable from grad_fn within `depth` steps (the custom op or the Function)."""
    names, frontier = [], [grad_fn]
    for _ in range(depth):
        names += [type(node).__name__ + _node_name(node) for node in frontier]
        frontier = [nxt for node in frontier for nxt, _ in _next_functions(node) if nxt is not None]
    return " ".join(names)


def _assert_same(experts, x, index, weights):
    ref = _run(experts, False, x, index, weights)
    from unittest import mock

    import trainer.kernels.fused_expert_mlp as fused_mlp

    with mock.patch.object(fused_mlp, "_forward", wraps=fused_mlp._forward) as forward, \
            mock.patch.object(fused_mlp, "_backward", wraps=fused_mlp._backward) as backward:
        fused = _run(experts, True, x, index, weights)
    # The fused kernels ran both ways (the autograd graph cannot be walked past a custom Function on torch 2.7).
    assert forward.called and backward.called
    names = _graph_names(fused[4])
    assert "expert_mlp_rows" in names or "ExpertMLPRows" in names or not _next_functions(fused[4])
    assert _relative(fused[0], ref[0]) <= 1e-5
    assert _relative(fused[1], ref[1]) <= 1e-5
    assert _relative(fused[2], ref[2]) <= 1e-5
    for name in ref[3]:
        assert _relative(fused[3][name], ref[3][name]) <= 1e-5, name


def test_swiglu_experts_match_the_unfused_path():
    experts = qwen3_experts()
    assert activation_for(experts).kind == "swiglu"
    index, weights = _routing(tokens=13, experts=experts.num_experts, top_k=2)
    _assert_same(experts, torch.randn(13, 32), index, weights)


def test_experts_without_tokens_get_zero_weight_gradients():
    experts = qwen3_experts()
    index, weights = _routing(tokens=9, experts=experts.num_experts, top_k=2, skip=(0, 3, 7))
    _assert_same(experts, torch.randn(9, 32), index, weights)
    set_fused_experts(experts, True)
    experts.zero_grad(set_to_none=True)
    fast_experts_forward(experts, torch.randn(9, 32), index, weights).sum().backward()
    for e in (0, 3, 7):
        assert torch.all(experts.gate_up_proj.grad[e] == 0) and torch.all(experts.down_proj.grad[e] == 0)
    assert experts.moe_last_tokens_per_expert.tolist() == torch.bincount(index.flatten(), minlength=8).tolist()


def test_relu2_experts_without_gate_match_the_unfused_path():
    experts = nemotron_experts()
    assert activation_for(experts).kind == "relu2"
    index, weights = _routing(tokens=11, experts=experts.num_experts, top_k=2)
    _assert_same(experts, torch.randn(11, 32), index, weights)


def test_custom_gate_goes_through_the_generic_activation():
    experts = qwen3_experts()
    experts._apply_gate = lambda gate_up: torch.tanh(gate_up[:, :16]) * gate_up[:, 16:] ** 2  # instance override
    experts.__dict__.pop("_moe_activation", None)
    assert activation_for(experts).kind == "module"
    index, weights = _routing(tokens=10, experts=experts.num_experts, top_k=2)
    _assert_same(experts, torch.randn(10, 32), index, weights)


def test_whole_model_loss_and_gradients_match_with_fused_experts():
    torch.manual_seed(0)
    config = tiny_configs.qwen3_moe(output_router_logits=True, router_aux_loss_coef=0.01)
    reference = MoEAutoModelForCausalLM.from_config(copy.deepcopy(config))
    for name, p in reference.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.2)
    fused = MoEAutoModelForCausalLM.from_config(config)
    fused.load_state_dict(reference.state_dict())
    assert set_fused_experts(fused) == config.num_hidden_layers
    ids = torch.randint(0, tiny_configs.VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    losses = []
    for model in (reference, fused):
        out = model(ids, labels=ids)
        out.loss.backward()
        losses.append(out.loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])
    grads = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        assert _relative(p.grad, grads[name].grad) <= 1e-5, name


def test_weight_gradient_form_equals_a_per_expert_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 8, generator=g), torch.randn(10, 16, generator=g)
    offsets = torch.tensor([3, 3, 10, 10], dtype=torch.int32)
    out = grouped_mm_weight_grad(a, b, offsets, 4, force_loop=True)
    torch.testing.assert_close(out[0], a[:3].t() @ b[:3])
    torch.testing.assert_close(out[2], a[3:].t() @ b[3:])
    assert torch.all(out[1] == 0) and torch.all(out[3] == 0)
    if hasattr(torch, "_grouped_mm"):
        try:
            fused = torch._grouped_mm(a.t(), b, offs=offsets)  # CPU kernel exists in recent torch only
        except (RuntimeError, NotImplementedError):
            pytest.skip("this torch has no CPU grouped_mm")
        torch.testing.assert_close(fused, out)
