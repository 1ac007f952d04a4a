"""trainer.optim.AdamW after the backward (fp32, CPU): the update of torch.optim.AdamW(fused=True), weight decay on
matrices only, a skip decided on the device, and state dicts that load into torch's AdamW and back.

Tolerance: 1e-6 absolute on every parameter (both run torch's fused AdamW kernel; the per-layer buckets change only
which tensors one launch takes, so the values agree to rounding).
"""

from __future__ import annotations

import copy

import pytest
import torch

from perf_options import perf_options
from trainer.config import OptimConfig
from trainer.optim import build_optimizer

CONFIG = OptimConfig(lr=1e-2, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8)
X = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))


def _model() -> torch.nn.Module:
    """Matrices (decayed) and vectors: biases and a norm's weight (never decayed)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))


def _torch_adamw(model: torch.nn.Module, fused: bool = True) -> torch.optim.AdamW:
    """torch's AdamW with the recipe's hyper-parameters and weight decay on the >= 2-D parameters only."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": CONFIG.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=CONFIG.lr, betas=tuple(CONFIG.betas), eps=CONFIG.eps, fused=fused)


def _backward(model: torch.nn.Module) -> None:
    model(X).square().mean().backward()


def _assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_weight_decay_applies_to_matrices_only():
    model = _model()
    optimizer = build_optimizer(model, CONFIG, perf_options())
    decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    assert decay == {0.1: {id(p) for p in model.parameters() if p.ndim >= 2},
                     0.0: {id(p) for p in model.parameters() if p.ndim < 2}}


def test_steps_without_a_non_finite_flag_equal_torchs_fused_adamw():
    ours, reference = _model(), _model()
    optimizer, torch_optimizer = build_optimizer(ours, CONFIG, perf_options()), _torch_adamw(reference)
    for _ in range(4):
        for model, opt in ((ours, optimizer), (reference, torch_optimizer)):
            _backward(model)
            opt.step(**({"found_inf": torch.zeros(())} if opt is optimizer else {}))
            opt.zero_grad(set_to_none=True)
    _assert_same_parameters(ours, reference)


@pytest.mark.parametrize("shape", [(), (1,)], ids=["scalar", "one-element"])
def test_a_flagged_step_changes_no_parameter_moment_or_step_count(shape):
    model = _model()
    optimizer = build_optimizer(model, CONFIG, perf_options())
    _backward(model)
    optimizer.step(found_inf=torch.zeros(shape))
    optimizer.zero_grad(set_to_none=True)
    before = copy.deepcopy(optimizer.state_dict()), [p.detach().clone() for p in model.parameters()]

    _backward(model)
    optimizer.step(found_inf=torch.ones(shape))
    after = optimizer.state_dict()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before[1]))
    for index, state in before[0]["state"].items():
        assert float(after["state"][index]["step"]) == float(state["step"]) == 1.0
        assert torch.equal(after["state"][index]["exp_avg"], state["exp_avg"])
        assert torch.equal(after["state"][index]["exp_avg_sq"], state["exp_avg_sq"])


def test_state_dict_loads_into_torchs_adamw_and_back_with_the_same_step_meaning():
    """"step" counts the steps taken, as in torch's AdamW: each optimizer continues the other's run, with the bias
    corrections of the step it is at, as if it had taken every step itself."""
    ours, reference = _model(), _model()
    optimizer, torch_optimizer = build_optimizer(ours, CONFIG, perf_options()), _torch_adamw(reference)
    for _ in range(3):  # both train 3 steps: the same parameters and states
        for model, opt in ((ours, optimizer), (reference, torch_optimizer)):
            _backward(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
    state = optimizer.state_dict()
    assert [float(s["step"]) for s in state["state"].values()] == [3.0] * len(state["state"])

    # ours -> torch: a copy of our model continues with torch's AdamW, the reference with its own
    continued = copy.deepcopy(ours)
    loaded = _torch_adamw(continued)
    loaded.load_state_dict(state)
    # torch -> ours: a fresh AdamW of ours takes over the reference's torch optimizer
    taken_over = copy.deepcopy(reference)
    ours_again = build_optimizer(taken_over, CONFIG, perf_options())
    ours_again.load_state_dict(torch_optimizer.state_dict())
    for _ in range(2):
        for model, opt in ((continued, loaded), (reference, torch_optimizer), (taken_over, ours_again)):
            _backward(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert [float(s["step"]) for s in loaded.state.values()] == [5.0] * len(loaded.state)
    assert [float(s["step"]) for s in ours_again.state_dict()["state"].values()] == [5.0] * len(loaded.state)
    _assert_same_parameters(continued, reference)
    _assert_same_parameters(taken_over, reference)


def test_a_loaded_optimizer_updates_with_its_param_groups_learning_rate():
    """After loading (every resume), the LR schedule still drives the update: it sets the loaded param groups' lr."""
    model = _model()
    optimizer = build_optimizer(model, CONFIG, perf_options())
    _backward(model)
    optimizer.step()
    optimizer.load_state_dict(optimizer.state_dict())
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    _backward(model)
    optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_state_bytes_counts_both_moments():
    model = _model()
    optimizer = build_optimizer(model, CONFIG, perf_options())
    assert optimizer.state_bytes() == 2 * 4 * sum(p.numel() for p in model.parameters())
