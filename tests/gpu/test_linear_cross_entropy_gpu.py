"""On a GPU: the chunked linear + cross-entropy with its compiled chunk function (what `perf.fused_ce` runs on CUDA)
against the full-logits formula, and against the same function run eagerly.

Run: `pytest -m gpu tests/gpu/test_linear_cross_entropy_gpu.py`. Tolerances: fp32 inputs 1e-5 relative (loss and
both gradients); bf16 inputs: loss within 1e-3 relative of the fp32 formula, gradients within 2e-2 relative (bf16
logits and bf16 gradient chunks, as Liger's kernel).
"""

from __future__ import annotations

import pytest
import torch

from trainer.kernels.linear_cross_entropy import (IGNORE_INDEX, chunked_linear_cross_entropy_sum,
                                                  reference_linear_cross_entropy_sum)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _inputs(rows=3000, dim=256, vocab=32000, dtype=torch.float32):
    g = torch.Generator("cuda").manual_seed(0)
    h = torch.randn(rows, dim, device="cuda", generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(vocab, dim, device="cuda", generator=g) / dim**0.5).to(dtype).requires_grad_(True)
    t = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    t[::7] = IGNORE_INDEX
    return h, w, t


def _relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _loss_and_grads(fn, h, w, t, **kw):
    loss = fn(h, w, t, **kw)
    gh, gw = torch.autograd.grad(loss * 0.5, (h, w))
    return loss.detach(), gh, gw


@pytest.mark.parametrize("chunk_bytes", [4 * 32000 * 512, 1 << 30])  # 6 chunks with a tail, one chunk
def test_compiled_chunks_equal_the_full_logits_formula_in_fp32(chunk_bytes):
    h, w, t = _inputs()
    loss, gh, gw = _loss_and_grads(chunked_linear_cross_entropy_sum, h, w, t, chunk_bytes=chunk_bytes, compiled=True)
    rl, rh, rw = _loss_and_grads(reference_linear_cross_entropy_sum, h, w, t)
    assert abs(loss.item() - rl.item()) <= 1e-5 * abs(rl.item())
    assert _relative(gh, rh) <= 1e-5 and _relative(gw, rw) <= 1e-5


def test_compiled_bf16_chunks_match_the_fp32_formula_and_the_eager_chunks():
    h, w, t = _inputs(dtype=torch.bfloat16)
    loss, gh, gw = _loss_and_grads(chunked_linear_cross_entropy_sum, h, w, t, chunk_bytes=4 * 32000 * 512)
    eager = _loss_and_grads(chunked_linear_cross_entropy_sum, h, w, t, chunk_bytes=4 * 32000 * 512, compiled=False)
    h32, w32 = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    rl, rh, rw = _loss_and_grads(reference_linear_cross_entropy_sum, h32, w32, t)
    assert abs(loss.item() - rl.item()) <= 1e-3 * abs(rl.item())
    assert _relative(gh, rh) <= 2e-2 and _relative(gw, rw) <= 2e-2
    assert abs(loss.item() - eager[0].item()) <= 1e-5 * abs(eager[0].item())
    assert _relative(gh, eager[1]) <= 1e-2 and _relative(gw, eager[2]) <= 1e-2
