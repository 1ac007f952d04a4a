"""On a GPU: the row-bounded kernels of the all-gather dispatcher's expert side (`trainer.kernels.bounded_rows`)
equal the torch formulas below the device-held row count, and the gathered expert path trains the same with and
without them.

Run: `pytest -m gpu tests/gpu/test_bounded_rows_gpu.py`. Tolerances: the gather is exact (a copy, or one bf16
product as torch's); the activations use the torch formulas' arithmetic (fp32 inside, one rounding), so they are
exact too up to the fp32 sigmoid (rtol 1e-2 / atol 1e-2 in bf16 covers one rounding step); the end-to-end check
allows bf16 noise of a reordered reduction (2e-2).
"""

from __future__ import annotations

import pytest
import torch

from trainer.kernels import bounded_rows
from trainer.kernels.fused_expert_mlp import _relu2_backward, _relu2_forward, _swiglu_backward, _swiglu_forward

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _bound(n: int) -> torch.Tensor:
    return torch.tensor([n], dtype=torch.int32, device="cuda")


@pytest.mark.parametrize("scaled", [False, True])
def test_gather_writes_the_rows_below_the_bound_like_index_select(scaled):
    g = torch.Generator("cuda").manual_seed(0)
    src = torch.randn(300, 2100, device="cuda", generator=g).to(torch.bfloat16)
    index = torch.randint(0, 300, (500,), device="cuda", generator=g)
    scale = torch.rand(500, device="cuda", generator=g).to(torch.bfloat16) if scaled else None
    got = bounded_rows.gather_rows(src, index, _bound(321), scale)
    want = src[index] if scale is None else src[index] * scale.unsqueeze(1)
    assert torch.equal(got[:321], want[:321])


def test_activations_below_the_bound_equal_the_torch_formulas():
    g = torch.Generator("cuda").manual_seed(1)
    pre = torch.randn(400, 2 * 768, device="cuda", generator=g).to(torch.bfloat16)
    grad = torch.randn(400, 768, device="cuda", generator=g).to(torch.bfloat16)
    bound, n = _bound(257), 257
    tol = dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(bounded_rows.swiglu_forward(pre, bound)[:n], _swiglu_forward(pre)[:n], **tol)
    torch.testing.assert_close(bounded_rows.swiglu_backward(pre, grad, bound)[:n], _swiglu_backward(pre, grad)[:n],
                               **tol)
    pre2 = pre[:, :768].contiguous()
    assert torch.equal(bounded_rows.relu2_forward(pre2, bound)[:n], _relu2_forward(pre2)[:n])
    assert torch.equal(bounded_rows.relu2_backward(pre2, grad, bound)[:n], _relu2_backward(pre2, grad)[:n])


def test_gathered_expert_path_equal_with_and_without_the_bounded_kernels(monkeypatch):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from trainer.moe.experts import fast_experts_forward, register_fast_experts, set_fused_experts
    from trainer.parallel.allgather import GatheredTokens
    from trainer.parallel.apply import rank_experts, stacked_expert_params

    class FirstHalfHere:
        name, gathers_tokens = "first-half", True

        def gather(self, x, index, weights, num_experts):
            keep = index < num_experts // 2
            return GatheredTokens(x, torch.where(keep, index, num_experts // 2), torch.where(keep, weights, 0.0),
                                  keep, num_experts // 2)

        def scatter(self, out):
            return out

    config = Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=128, num_experts=16, num_experts_per_tok=4)
    config._experts_implementation = register_fast_experts()
    torch.manual_seed(0)
    experts = Qwen3MoeExperts(config).cuda().to(torch.bfloat16)
    for name, param in stacked_expert_params(experts):
        torch.nn.init.normal_(param, std=0.05)
        setattr(experts, name, torch.nn.Parameter(rank_experts(param, 0, 2)))
    experts.moe_dispatcher = FirstHalfHere()
    set_fused_experts(experts, True, "liger")
    g = torch.Generator("cuda").manual_seed(2)
    x = torch.randn(512, 256, device="cuda", generator=g).to(torch.bfloat16)
    index = torch.stack([torch.randperm(16, device="cuda", generator=g)[:4] for _ in range(512)])
    weights = torch.rand(512, 4, device="cuda", generator=g)

    def step():
        experts.zero_grad(set_to_none=True)
        xx, ww = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        out = fast_experts_forward(experts, xx, index, ww)
        out.backward(torch.ones_like(out))
        return [out, xx.grad, ww.grad] + [p.grad for p in experts.parameters()]

    bounded = step()
    monkeypatch.setattr(bounded_rows, "usable", lambda *tensors: False)
    plain = step()
    for got, want in zip(bounded, plain):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
