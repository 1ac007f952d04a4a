"""relu(x)^2 and its backward, one Triton pass each (Nemotron-H's expert activation).

    h = relu2_forward(pre)              # max(pre, 0)^2, in pre's dtype
    grad_pre = relu2_backward(pre, grad_h)   # 2 * max(pre, 0) * grad_h, computed in fp32, in pre's dtype

The same arithmetic as the torch formulas in `trainer.kernels.fused_expert_mlp` (fp32 inside, one rounding at the
end), so the results are bit-identical; torch spends five to six passes over [rows, width] fp32 temporaries on the
backward. CUDA tensors that are contiguous only (`usable`).
"""

from __future__ import annotations

import functools

import torch

from trainer.kernels.triton_support import blocks, triton_loads_on_cuda

BLOCK = 2048


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def forward_kernel(pre_ptr, h_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        pre = tl.load(pre_ptr + offsets, mask=mask).to(tl.float32)
        relu = tl.maximum(pre, 0.0)
        tl.store(h_ptr + offsets, (relu * relu).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def backward_kernel(pre_ptr, grad_h_ptr, grad_pre_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        pre = tl.load(pre_ptr + offsets, mask=mask).to(tl.float32)
        grad_h = tl.load(grad_h_ptr + offsets, mask=mask).to(tl.float32)
        grad = (2.0 * tl.maximum(pre, 0.0)) * grad_h
        tl.store(grad_pre_ptr + offsets, grad.to(grad_pre_ptr.dtype.element_ty), mask=mask)

    return forward_kernel, backward_kernel


@functools.cache
def available() -> bool:
    """Whether Triton is importable and a CUDA device is present."""
    return triton_loads_on_cuda(_kernels)


def usable(*tensors: torch.Tensor) -> bool:
    return available() and all(t.is_cuda and t.is_contiguous() for t in tensors)


def relu2_forward(pre: torch.Tensor) -> torch.Tensor:
    h = torch.empty_like(pre)
    n = pre.numel()
    if n:
        _kernels()[0][(blocks(n, BLOCK),)](pre, h, n, BLOCK=BLOCK, num_warps=4)
    return h


def relu2_backward(pre: torch.Tensor, grad_h: torch.Tensor) -> torch.Tensor:
    grad_pre = torch.empty_like(pre)
    n = pre.numel()
    if n:
        _kernels()[1][(blocks(n, BLOCK),)](pre, grad_h, grad_pre, n, BLOCK=BLOCK, num_warps=4)
    return grad_pre
