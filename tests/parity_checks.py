"""The check every parity suite makes: a fast model computes the same function as the HF reference in float32.

Tolerances: logits <= 1e-5 max-abs, loss and every parameter gradient <= 1e-5 relative (summation order only); a
gradient that is zero (or absent) in the reference must be zero (or absent) in the fast model too.

Two different implementations (plain transformers and ours, or one model before and after a save/load round trip
through another class) are never compared bit for bit: which kernels run depends on the CPU (AVX2 vs AVX-512,
oneDNN's choice of blocking), and fp32 results move by ~1e-7 between machines. Bit-exactness is asserted only where
the same code runs twice (a resumed run, a tensor read back from disk).
"""

from __future__ import annotations

import torch

TOLERANCE = 1e-5
LOGITS_RTOL = LOGITS_ATOL = 1e-5  # fp32 logits of two implementations of one function, on any x86-64 CPU


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 logits of two implementations agree within the stated tolerance (not bit for bit: kernels differ)."""
    torch.testing.assert_close(actual, expected, rtol=LOGITS_RTOL, atol=LOGITS_ATOL)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def worst_relative(values, references) -> float:
    """The largest |a - b| / |b| over paired floats (losses of two runs, step by step)."""
    return max(abs(a - b) / abs(b) for a, b in zip(values, references))


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
