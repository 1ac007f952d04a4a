"""On a GPU: the Triton relu^2 kernels (`trainer.kernels.relu2`) give bit-identical results to the torch formulas
in `trainer.kernels.fused_expert_mlp` (same fp32 arithmetic, one rounding), and the fused experts use them.

Run: `pytest -m gpu tests/gpu/test_relu2_gpu.py`. Tolerance: exact (torch.equal), bf16 and fp32.
"""

from __future__ import annotations

import pytest
import torch

from trainer.kernels import relu2
from trainer.kernels.fused_expert_mlp import Activation, _relu2_backward, _relu2_forward

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (3, 2047), (4096, 1856)])
def test_kernels_equal_the_formulas(dtype, shape):
    g = torch.Generator("cuda").manual_seed(0)
    pre = torch.randn(shape, device="cuda", generator=g).to(dtype)
    grad_h = torch.randn(shape, device="cuda", generator=g).to(dtype)
    assert torch.equal(relu2.relu2_forward(pre), _relu2_forward(pre))
    assert torch.equal(relu2.relu2_backward(pre, grad_h), _relu2_backward(pre, grad_h))


def test_the_triton_backend_runs_the_kernels():
    pre = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    triton, formulas = Activation("relu2", None, "liger"), Activation("relu2", None, "torch")
    assert triton._use_triton_relu2(pre) and not formulas._use_triton_relu2(pre)
    grad_h = torch.randn_like(pre)
    assert torch.equal(triton.forward(pre), formulas.forward(pre))
    assert torch.equal(triton.backward(pre, grad_h), formulas.backward(pre, grad_h))
