"""On a GPU: the Triton K-way row sum and row dots (`trainer.kernels.row_sum`) equal the torch formulas they replace
in the combine, its weight gradient and the dispatch's backward (`trainer.moe.permute`), and never read the pairs
they are told to skip.

Run: `pytest -m gpu tests/gpu/test_row_sum_gpu.py`. Tolerances: fp32 1e-6 relative (both accumulate in fp32, only
the order over k differs); bf16 one rounding step (rtol 8e-3: both round the same fp32 sum once, which can land on
either side of a tie-close value); dots (fp32 results of 2,100-long bf16 products) 1e-5 relative + 1e-3 absolute
(the summation order over the columns differs).
"""

from __future__ import annotations

import pytest
import torch

from trainer.kernels import row_sum
from trainer.moe.permute import make_plan, permute_tokens, unpermute_and_combine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RTOL = {torch.float32: 1e-6, torch.bfloat16: 8e-3}


def _reference(rows, index, weights, keep):
    picked = rows[index].float()
    if weights is not None:
        picked = picked * weights.to(rows.dtype).float().unsqueeze(-1)
    if keep is not None:
        picked = torch.where(keep.unsqueeze(-1), picked, 0.0)
    return picked.sum(dim=1).to(rows.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_triton_row_sum_equals_the_torch_formula(dtype, weighted, masked):
    g = torch.Generator("cuda").manual_seed(0)
    rows = torch.randn(700, 2100, device="cuda", generator=g).to(dtype)  # width not a multiple of the block
    index = torch.randint(0, 700, (97, 8), device="cuda", generator=g)
    weights = torch.rand(97, 8, device="cuda", generator=g) if weighted else None
    keep = torch.rand(97, 8, device="cuda", generator=g) < 0.5 if masked else None
    assert row_sum.usable(rows, index, weights, keep)
    got = row_sum.gathered_row_sum(rows, index, weights, keep)
    torch.testing.assert_close(got, _reference(rows, index, weights, keep), rtol=RTOL[dtype], atol=RTOL[dtype])


@pytest.mark.parametrize("top_k", [8, 6])
@pytest.mark.parametrize("masked", [True, False])
def test_triton_row_dots_equal_the_torch_formula(top_k, masked):
    g = torch.Generator("cuda").manual_seed(2)
    rows = torch.randn(700, 2100, device="cuda", generator=g).to(torch.bfloat16)
    other = torch.randn(97, 2100, device="cuda", generator=g).to(torch.bfloat16)
    index = torch.randint(0, 700, (97, top_k), device="cuda", generator=g)
    keep = torch.rand(97, top_k, device="cuda", generator=g) < 0.5 if masked else None
    want = (rows[index].float() * other.unsqueeze(1).float()).sum(dim=-1)
    if keep is not None:
        want = torch.where(keep, want, 0.0)
    got = row_sum.gathered_row_dots(rows, index, other, keep)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)


def test_skipped_pairs_are_not_read():
    rows = torch.randn(64, 256, device="cuda")
    index = torch.randint(0, 64, (32, 4), device="cuda")
    keep = torch.ones(32, 4, dtype=torch.bool, device="cuda")
    keep[:, 1] = False
    rows[index[:, 1]] = float("nan")
    rows[index[:, [0, 2, 3]]] = torch.randn(32, 3, 256, device="cuda")  # rows shared with kept pairs stay finite
    got = row_sum.gathered_row_sum(rows, index, None, keep)
    assert torch.isfinite(got).all()
    dots = row_sum.gathered_row_dots(rows, index, torch.randn(32, 256, device="cuda"), keep)
    assert torch.isfinite(dots).all() and (dots[:, 1] == 0).all()


def test_combine_and_dispatch_backward_match_with_and_without_the_kernel(monkeypatch):
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(300, 512, device="cuda", generator=g, dtype=torch.bfloat16)
    index = torch.stack([torch.randperm(16, device="cuda", generator=g)[:4] for _ in range(300)])
    weights = torch.rand(300, 4, device="cuda", generator=g)
    keep = index < 12
    plan = make_plan(index, 16)

    def step():
        xx, ww = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        out = unpermute_and_combine(permute_tokens(xx, plan, keep) * 1.5, ww, plan, keep)
        out.backward(torch.ones_like(out))
        return out, xx.grad, ww.grad

    with_kernel = step()
    monkeypatch.setattr(row_sum, "usable", lambda *tensors: False)
    without = step()
    for got, want in zip(with_kernel, without):
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=8e-3)
