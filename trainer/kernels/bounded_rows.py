"""Row-wise kernels that stop at a row count held on the device: the all-gather dispatcher's expert side.

The all-gather dispatcher (`trainer.parallel.allgather`) sizes its row buffers for every (token, expert) pair of
the EP group, W*T*K rows, of which this rank computes only its own (~T*K; the count is the plan's last offset, on
the GPU). Torch ops and Liger's kernels run over the whole buffer; these read the count and skip the rows past it:

    gather_rows(src_ND, index_S, bound_1, scale_S=None)   out[s] = scale[s] * src[index[s]]     for s < bound
    swiglu_forward(pre_SF, bound_1)                       silu(gate) * up                       for rows < bound
    swiglu_backward(pre_SF, grad_h_SI, bound_1)           d pre                                 for rows < bound
    relu2_forward / relu2_backward(..., bound_1)          the same for relu^2

Rows past the bound are left as allocated (never read: the grouped GEMMs stop at the last offset and the combine
masks those pairs). The arithmetic is the torch formulas' of `trainer.kernels.fused_expert_mlp` (silu in fp32,
rounded, times up; backward in fp32, one rounding), so the rows below the bound equal the unbounded path's.
The gather is a torch custom op (opaque to torch.compile, no graph break); CUDA tensors only (`usable`).
"""

from __future__ import annotations

import functools

import torch

from trainer.kernels.triton_support import blocks, triton_loads_on_cuda

GATHER_BLOCK = 1024
ACT_BLOCK = 1024


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gather_kernel(src_ptr, index_ptr, scale_ptr, bound_ptr, out_ptr, width, HAS_SCALE: tl.constexpr,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if row >= tl.load(bound_ptr).to(tl.int64):
            return
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_row = columns < width
        src_row = tl.load(index_ptr + row).to(tl.int64)
        values = tl.load(src_ptr + src_row * width + columns, mask=in_row)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + row).to(values.dtype)
            values = values * scale
        tl.store(out_ptr + row * width + columns, values.to(out_ptr.dtype.element_ty), mask=in_row)

    @triton.jit
    def swiglu_forward_kernel(pre_ptr, h_ptr, bound_ptr, inner, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if row >= tl.load(bound_ptr).to(tl.int64):
            return
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = columns < inner
        gate = tl.load(pre_ptr + row * 2 * inner + columns, mask=mask).to(tl.float32)
        up = tl.load(pre_ptr + row * 2 * inner + inner + columns, mask=mask)
        silu = (gate * tl.sigmoid(gate)).to(up.dtype)
        tl.store(h_ptr + row * inner + columns, (silu * up).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_backward_kernel(pre_ptr, grad_h_ptr, grad_pre_ptr, bound_ptr, inner, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if row >= tl.load(bound_ptr).to(tl.int64):
            return
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = columns < inner
        gate = tl.load(pre_ptr + row * 2 * inner + columns, mask=mask).to(tl.float32)
        up = tl.load(pre_ptr + row * 2 * inner + inner + columns, mask=mask).to(tl.float32)
        grad = tl.load(grad_h_ptr + row * inner + columns, mask=mask).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        grad_gate = grad * up * sig * (1.0 + gate * (1.0 - sig))
        out = grad_pre_ptr + row * 2 * inner
        tl.store(out + columns, grad_gate.to(grad_pre_ptr.dtype.element_ty), mask=mask)
        tl.store(out + inner + columns, (grad * silu).to(grad_pre_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def relu2_kernel(pre_ptr, grad_h_ptr, out_ptr, bound_ptr, width, BACKWARD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if row >= tl.load(bound_ptr).to(tl.int64):
            return
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = columns < width
        relu = tl.maximum(tl.load(pre_ptr + row * width + columns, mask=mask).to(tl.float32), 0.0)
        if BACKWARD:
            grad = tl.load(grad_h_ptr + row * width + columns, mask=mask).to(tl.float32)
            value = (2.0 * relu) * grad
        else:
            value = relu * relu
        tl.store(out_ptr + row * width + columns, value.to(out_ptr.dtype.element_ty), mask=mask)

    return gather_kernel, swiglu_forward_kernel, swiglu_backward_kernel, relu2_kernel


@functools.cache
def _loads() -> bool:
    return triton_loads_on_cuda(_kernels)


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether Triton is importable and a CUDA device is present (a constant to torch.compile)."""
    return _loads()


def usable(*tensors: torch.Tensor | None) -> bool:
    return available() and all(t is None or (t.is_cuda and t.is_contiguous()) for t in tensors)


@torch.library.custom_op("moe_stack::gather_rows_bounded", mutates_args=())
def gather_rows(src_ND: torch.Tensor, index_S: torch.Tensor, bound_1: torch.Tensor,
                scale_S: torch.Tensor | None = None) -> torch.Tensor:
    """[N, D] rows, [S] source row per output row, a 1-element count -> [S, D]; rows past the count unwritten."""
    rows, width = index_S.shape[0], src_ND.shape[1]
    out_SD = src_ND.new_empty(rows, width)
    if rows and width:
        _kernels()[0][(rows, blocks(width, GATHER_BLOCK))](
            src_ND, index_S, scale_S if scale_S is not None else index_S, bound_1, out_SD, width,
            HAS_SCALE=scale_S is not None, BLOCK=GATHER_BLOCK, num_warps=4,
        )
    return out_SD


@gather_rows.register_fake
def _(src_ND, index_S, bound_1, scale_S=None):
    return src_ND.new_empty(index_S.shape[0], src_ND.shape[1])


def swiglu_forward(pre_SF: torch.Tensor, bound_1: torch.Tensor) -> torch.Tensor:
    rows, inner = pre_SF.shape[0], pre_SF.shape[1] // 2
    h_SI = pre_SF.new_empty(rows, inner)
    if rows and inner:
        _kernels()[1][(rows, blocks(inner, ACT_BLOCK))](pre_SF, h_SI, bound_1, inner, BLOCK=ACT_BLOCK, num_warps=4)
    return h_SI


def swiglu_backward(pre_SF: torch.Tensor, grad_h_SI: torch.Tensor, bound_1: torch.Tensor) -> torch.Tensor:
    rows, inner = pre_SF.shape[0], pre_SF.shape[1] // 2
    grad_pre_SF = torch.empty_like(pre_SF)
    if rows and inner:
        _kernels()[2][(rows, blocks(inner, ACT_BLOCK))](pre_SF, grad_h_SI.contiguous(), grad_pre_SF, bound_1, inner,
                                                         BLOCK=ACT_BLOCK, num_warps=4)
    return grad_pre_SF


def relu2_forward(pre_SI: torch.Tensor, bound_1: torch.Tensor) -> torch.Tensor:
    return _relu2(pre_SI, None, bound_1)


def relu2_backward(pre_SI: torch.Tensor, grad_h_SI: torch.Tensor, bound_1: torch.Tensor) -> torch.Tensor:
    return _relu2(pre_SI, grad_h_SI.contiguous(), bound_1)


def _relu2(pre_SI, grad_h_SI, bound_1):
    rows, width = pre_SI.shape
    out_SI = torch.empty_like(pre_SI)
    if rows and width:
        _kernels()[3][(rows, blocks(width, ACT_BLOCK))](pre_SI, grad_h_SI if grad_h_SI is not None else pre_SI,
                                                         out_SI, bound_1, width, BACKWARD=grad_h_SI is not None,
                                                         BLOCK=ACT_BLOCK, num_warps=4)
    return out_SI
