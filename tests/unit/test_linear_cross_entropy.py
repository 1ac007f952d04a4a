"""The chunked linear + cross-entropy equals the full-logits formula (value and both gradients), and the step's loss
built on it equals HF's."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny_configs
from trainer.kernels.linear_cross_entropy import (
    IGNORE_INDEX,
    chunked_linear_cross_entropy_sum,
    linear_cross_entropy_sum,
    reference_linear_cross_entropy_sum,
)
from trainer.loss import forward_loss_sum
from training_loop import micro_batch


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(rows=37, dim=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, dim, generator=g, requires_grad=True)
    w = torch.randn(vocab, dim, generator=g, requires_grad=True)
    t = torch.randint(0, vocab, (rows,), generator=g)
    t[::5] = IGNORE_INDEX  # some positions are not trained
    return h, w, t


@pytest.mark.parametrize("chunk_bytes", [4 * 50 * 1, 4 * 50 * 8, 1 << 30])  # 1 row, 8 rows, everything at once
def test_chunked_loss_and_gradients_equal_the_full_logits_formula_in_fp32(chunk_bytes):
    h, w, t = _inputs()
    loss = chunked_linear_cross_entropy_sum(h, w, t, chunk_bytes=chunk_bytes)
    gh, gw = torch.autograd.grad(loss * 0.5, (h, w))
    ref = reference_linear_cross_entropy_sum(h, w, t)
    rh, rw = torch.autograd.grad(ref * 0.5, (h, w))
    # fp32: only the summation order differs (per chunk vs all rows), ~1e-7 relative
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert _relative(gh, rh) <= 1e-5
    assert _relative(gw, rw) <= 1e-5


def test_ignored_rows_get_zero_gradient_and_all_ignored_gives_zero_loss():
    h, w, t = _inputs()
    gh = torch.autograd.grad(chunked_linear_cross_entropy_sum(h, w, t, chunk_bytes=4 * 50 * 3), h)[0]
    assert torch.all(gh[::5] == 0)
    t_all = torch.full_like(t, IGNORE_INDEX)
    assert chunked_linear_cross_entropy_sum(h, w, t_all).item() == 0.0


def test_frozen_head_weight_is_supported():
    h, w, t = _inputs()
    w = w.detach()
    gh = torch.autograd.grad(chunked_linear_cross_entropy_sum(h, w, t), h)[0]
    rh = torch.autograd.grad(reference_linear_cross_entropy_sum(h, w, t), h)[0]
    assert _relative(gh, rh) <= 1e-5


def test_bf16_inputs_stay_close_to_the_fp32_formula():
    h, w, t = _inputs(rows=64, dim=32, vocab=128)
    loss = chunked_linear_cross_entropy_sum(h.bfloat16(), w.bfloat16(), t, chunk_bytes=4 * 128 * 16)
    ref = reference_linear_cross_entropy_sum(h, w, t)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 2e-2 * abs(ref.item())  # bf16 logits: ~3 significant digits


@pytest.mark.parametrize("fused_ce", [True, False], ids=["fused", "plain"])
def test_the_steps_loss_over_shifted_targets_equals_the_hf_causal_lm_loss(fused_ce):
    """The step's summed loss (`trainer.loss.forward_loss_sum`, targets = ids shifted left, the last position not
    trained) divided by the trained tokens is HF's causal LM loss with labels = ids, within 1e-5 relative."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(tiny_configs.qwen3_moe()))
    ids = torch.randint(0, tiny_configs.VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    hf_loss = model(ids, labels=ids).loss

    batch = micro_batch(ids)
    loss_sum, _ = forward_loss_sum(model, batch, fused_ce=fused_ce)
    ours = loss_sum / (batch["targets"] != IGNORE_INDEX).sum()
    assert abs(ours.item() - hf_loss.item()) <= 1e-5 * abs(hf_loss.item())


def test_unknown_backend_is_rejected():
    h, w, t = _inputs()
    with pytest.raises(ValueError, match="unknown linear cross-entropy backend"):
        linear_cross_entropy_sum(h, w, t, backend="nope")
