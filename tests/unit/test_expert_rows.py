"""trainer.parallel.expert_rows: the expert side of expert parallelism against plain autograd.

reduce_rows keeps only the expert outputs for its backward; its forward and both gradients must equal the padded
[R, K, D] batched product under autograd: exactly in float64 (gradcheck) and within 1e-6 relative in float32.
"""

from __future__ import annotations

import torch

from trainer.parallel.expert_rows import expand_to_rows, plan_expert_rows, reduce_rows

R, K, D, LOCAL = 13, 4, 6, 3


def _received(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids_RK = torch.randint(-1, LOCAL, (R, K), generator=g)  # -1: the expert lives on another rank
    ids_RK[0] = -1  # a token with no local expert
    weights_RK = torch.where(ids_RK >= 0, torch.rand(R, K, generator=g), 0.0).to(dtype)
    rows = plan_expert_rows(ids_RK, LOCAL, int((ids_RK >= 0).sum()))
    y_SD = torch.randn(rows.pair_of_row_S.numel(), D, generator=g, dtype=dtype)
    return rows, y_SD, weights_RK


def _padded_reference(y_SD, weights_RK, rows):
    y_PD = y_SD.new_zeros(R * K, D).index_copy(0, rows.pair_of_row_S, y_SD)
    return torch.bmm(weights_RK.unsqueeze(1), y_PD.view(R, K, D)).squeeze(1)


def test_reduce_rows_gradients_are_exact_in_float64():
    rows, y_SD, weights_RK = _received(torch.float64)
    y_SD.requires_grad_(True)
    weights_RK.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y, w: reduce_rows(y, w, rows), (y_SD, weights_RK))


def test_reduce_rows_equals_the_padded_product_forward_and_backward():
    rows, y_SD, weights_RK = _received(torch.float32, seed=1)
    grad_RD = torch.randn(R, D, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (reduce_rows, _padded_reference):
        y, w = y_SD.clone().requires_grad_(True), weights_RK.clone().requires_grad_(True)
        out = fn(y, w, rows)
        out.backward(grad_RD)
        results.append((out.detach(), y.grad, w.grad))
    for ours, reference in zip(*results):
        assert ((ours - reference).norm() / reference.norm()).item() <= 1e-6


def test_expand_then_reduce_weights_each_token_by_its_local_experts():
    rows, _, weights_RK = _received(torch.float32, seed=3)
    x_RD = torch.randn(R, D)
    out = reduce_rows(expand_to_rows(x_RD, rows), weights_RK, rows)
    assert torch.allclose(out, x_RD * weights_RK.sum(dim=1, keepdim=True), atol=1e-6)
