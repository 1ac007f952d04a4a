"""The check every parity suite makes: a fast model computes the same function as the HF reference in float32.

Tolerances: logits <= 1e-5 max-abs, loss and every parameter gradient <= 1e-5 relative (summation order only); a
gradient that is zero (or absent) in the reference must be zero (or absent) in the fast model too.
"""

from __future__ import annotations

import torch

TOLERANCE = 1e-5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_same_function(reference, fast, ref_out, fast_out) -> list[str]:
    """Compare outputs and the gradients left by their backward; returns the names of the gradients compared."""
    assert (fast_out.logits - ref_out.logits).abs().max().item() <= TOLERANCE
    assert abs(fast_out.loss.item() - ref_out.loss.item()) <= TOLERANCE * abs(ref_out.loss.item())
    ref_grads = dict(reference.named_parameters())
    checked = []
    for name, param in fast.named_parameters():
        ref_grad = ref_grads[name].grad
        if ref_grad is None or ref_grad.norm() == 0:
            assert param.grad is None or param.grad.norm() == 0, name
            continue
        assert relative(param.grad, ref_grad) <= TOLERANCE, name
        checked.append(name)
    return checked
