"""Each token's K rows, gathered by index and summed (weighted or not), in one Triton pass: the combine step of the
expert MLP and the backward of its dispatch; and the combine's weight gradient, each pair's row dotted with its
token's output gradient.

    out[t] = sum_k keep[t, k] ? w[t, k] * rows[index[t, k]] : 0        (fp32 accumulation, one rounding at the end)
    dots[t, k] = keep[t, k] ? <rows[index[t, k]], other[t]> : 0        (fp32)

The weight is first rounded to the rows' dtype (as `trainer.moe.permute` does before its fp32 product), pairs with
keep = False are not loaded at all (the all-gather dispatcher's pairs computed elsewhere: half of them at EP=2), and
k runs in ascending order, so the result is deterministic. Inductor's fused gather + K-way sum reaches about a fifth
of the memory bandwidth on these [T, K] x [D] gathers (bench/gathered_experts.py); one program per (token, column
block) with masked loads keeps the rows' reads coalesced and skips what is not needed.

A torch custom op (opaque to torch.compile, so a compiled layer calls it without a graph break); CUDA tensors only,
`usable()` says when. The torch formula is the reference (`trainer.moe.permute`), tested to agree.
"""

from __future__ import annotations

import functools

import torch

from trainer.kernels.triton_support import blocks, triton_loads_on_cuda

BLOCK_D = 1024
DOTS_BLOCK_D = 512  # columns per step of the dots kernel (K rows of them in registers at once)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def row_sum_kernel(rows_ptr, index_ptr, weight_ptr, keep_ptr, out_ptr, width, K: tl.constexpr,
                       HAS_WEIGHT: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_row = columns < width
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            pair = token * K + k
            row = tl.load(index_ptr + pair).to(tl.int64)
            mask = in_row
            if HAS_KEEP:
                mask = mask & (tl.load(keep_ptr + pair) != 0)
            values = tl.load(rows_ptr + row * width + columns, mask=mask, other=0.0)
            if HAS_WEIGHT:
                weight = tl.load(weight_ptr + pair).to(rows_ptr.dtype.element_ty).to(tl.float32)
                acc += weight * values.to(tl.float32)
            else:
                acc += values.to(tl.float32)
        tl.store(out_ptr + token * width + columns, acc.to(out_ptr.dtype.element_ty), mask=in_row)

    @triton.jit
    def row_dots_kernel(rows_ptr, index_ptr, other_ptr, keep_ptr, out_ptr, width, K: tl.constexpr,
                        K_POW2: tl.constexpr, HAS_KEEP: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        ks = tl.arange(0, K_POW2)
        keep = ks < K
        pairs = token * K + ks
        rows = tl.load(index_ptr + pairs, mask=keep, other=0).to(tl.int64)
        if HAS_KEEP:
            keep = keep & (tl.load(keep_ptr + pairs, mask=keep, other=0) != 0)
        acc = tl.zeros([K_POW2, BLOCK], dtype=tl.float32)
        for start in tl.range(0, width, BLOCK):
            columns = start + tl.arange(0, BLOCK)
            in_row = columns < width
            other = tl.load(other_ptr + token * width + columns, mask=in_row, other=0.0).to(tl.float32)
            values = tl.load(rows_ptr + rows[:, None] * width + columns[None, :],
                             mask=keep[:, None] & in_row[None, :], other=0.0).to(tl.float32)
            acc += values * other[None, :]
        tl.store(out_ptr + pairs, tl.sum(acc, axis=1), mask=ks < K)

    return row_sum_kernel, row_dots_kernel


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _loads() -> bool:
    return triton_loads_on_cuda(_kernel)


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether Triton is importable and a CUDA device is present (a constant to torch.compile: it never traces
    the import)."""
    return _loads()


def usable(*tensors: torch.Tensor | None) -> bool:
    return available() and all(t is None or (t.is_cuda and t.is_contiguous()) for t in tensors)


@torch.library.custom_op("moe_stack::gathered_row_sum", mutates_args=())
def gathered_row_sum(rows_SD: torch.Tensor, index_TK: torch.Tensor, weights_TK: torch.Tensor | None,
                     keep_TK: torch.Tensor | None) -> torch.Tensor:
    """[S, D] rows, [T, K] row indices (optional weights, optional keep mask) -> [T, D] in the rows' dtype."""
    num_tokens, top_k = index_TK.shape
    width = rows_SD.shape[1]
    out_TD = rows_SD.new_empty(num_tokens, width)
    if num_tokens and width:
        _kernel()[0][(num_tokens, blocks(width, BLOCK_D))](
            rows_SD, index_TK, weights_TK if weights_TK is not None else index_TK,
            keep_TK if keep_TK is not None else index_TK, out_TD, width, K=top_k,
            HAS_WEIGHT=weights_TK is not None, HAS_KEEP=keep_TK is not None, BLOCK=BLOCK_D, num_warps=4,
        )
    return out_TD


@gathered_row_sum.register_fake
def _(rows_SD, index_TK, weights_TK, keep_TK):
    return rows_SD.new_empty(index_TK.shape[0], rows_SD.shape[1])


@torch.library.custom_op("moe_stack::gathered_row_dots", mutates_args=())
def gathered_row_dots(rows_SD: torch.Tensor, index_TK: torch.Tensor, other_TD: torch.Tensor,
                      keep_TK: torch.Tensor | None) -> torch.Tensor:
    """[S, D] rows, [T, K] row indices, [T, D] one vector per token -> [T, K] fp32: the dot product of each pair's
    row with its token's vector (0 where keep is False; the row is then not loaded)."""
    num_tokens, top_k = index_TK.shape
    out_TK = torch.empty(num_tokens, top_k, dtype=torch.float32, device=rows_SD.device)
    if num_tokens:
        _kernel()[1][(num_tokens,)](
            rows_SD, index_TK, other_TD, keep_TK if keep_TK is not None else index_TK, out_TK, rows_SD.shape[1],
            K=top_k, K_POW2=_next_power_of_2(top_k), HAS_KEEP=keep_TK is not None, BLOCK=DOTS_BLOCK_D,
            num_warps=8,
        )
    return out_TK


@gathered_row_dots.register_fake
def _(rows_SD, index_TK, other_TD, keep_TK):
    return torch.empty(index_TK.shape, dtype=torch.float32, device=rows_SD.device)
