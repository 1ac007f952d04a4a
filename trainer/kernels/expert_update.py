"""The experts' weight gradient and their AdamW update in one pass: the gradient is never written to memory.

    weight_grad_adamw_(a_SP, b_SQ, offsets_E, param_EPQ, state)     # param[e] -= AdamW(a[rows_e]^T @ b[rows_e])

At 4k tokens per step the expert weights' AdamW (7.2B of B1's 8.1B parameters) is the largest memory-bound cost of
the step and runs partly after the backward has ended. Here the backward's per-expert weight-gradient GEMM ends in
the update: each output tile of a[rows_e]^T @ b[rows_e] (fp32 accumulator, rounded to the parameter's dtype as the
unfused gradient would be) is combined with the tile's weight and AdamW states, which are written back. The
gradient never exists as a tensor (4 of the 16 bytes per parameter that a separate GEMM + AdamW move), and the
update's traffic runs inside the GEMM.

`ExpertUpdate` holds what the update needs besides the weights: both AdamW states per weight, the shared step counter
(a device tensor, read on the device) and the hyper-parameters. Off CUDA, or without Triton, the same update is the
grouped weight-gradient GEMM followed by `torch._fused_adamw_` (the reference the kernel is tested against).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from trainer.moe.grouped_gemm import grouped_mm_weight_grad


@dataclass
class ExpertUpdate:
    """AdamW state for one experts module's weights, updated inside its backward (`trainer.perf` builds it)."""

    states: dict[str, tuple[torch.Tensor, torch.Tensor]]  # weight name -> (exp_avg, exp_avg_sq)
    step: torch.Tensor  # fp32 [] on the weights' device: the step being taken (1-based)
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    def hyper(self) -> dict:
        return dict(lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay)


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def grad_adamw_kernel(a_ptr, b_ptr, offsets_ptr, w_ptr, m_ptr, v_ptr, step_ptr, P, Q, stride_a, stride_b,
                          lr, beta1, beta2, eps, weight_decay, log2_beta1, log2_beta2,
                          BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr,
                          INPUT_PRECISION: tl.constexpr):
        pid_p = tl.program_id(0)
        pid_q = tl.program_id(1)
        expert = tl.program_id(2)
        start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int64)
        end = tl.load(offsets_ptr + expert).to(tl.int64)
        rows_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        rows_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        in_p = rows_p < P
        in_q = rows_q < Q
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
        for s0 in range(start, end, BLOCK_S):
            rows_s = s0 + tl.arange(0, BLOCK_S)
            in_s = rows_s < end
            a = tl.load(a_ptr + rows_s[:, None] * stride_a + rows_p[None, :], mask=in_s[:, None] & in_p[None, :],
                        other=0.0)
            b = tl.load(b_ptr + rows_s[:, None] * stride_b + rows_q[None, :], mask=in_s[:, None] & in_q[None, :],
                        other=0.0)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
        offsets = expert.to(tl.int64) * P * Q + rows_p[:, None].to(tl.int64) * Q + rows_q[None, :]
        mask = in_p[:, None] & in_q[None, :]
        # the gradient as the unfused path stores it (the parameter's dtype), then AdamW as torch._fused_adamw_
        grad = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
        step = tl.load(step_ptr)
        bias_correction1 = 1.0 - tl.exp2(step * log2_beta1)
        bias_correction2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(step * log2_beta2))
        param = tl.load(w_ptr + offsets, mask=mask).to(tl.float32)
        exp_avg = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
        exp_avg_sq = tl.load(v_ptr + offsets, mask=mask).to(tl.float32)
        param = param - lr * weight_decay * param
        exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
        denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
        param = param - tl.div_rn((lr / bias_correction1) * exp_avg, denom)
        tl.store(w_ptr + offsets, param.to(w_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offsets, exp_avg.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offsets, exp_avg_sq.to(v_ptr.dtype.element_ty), mask=mask)

    return grad_adamw_kernel


@functools.cache
def triton_available() -> bool:
    """Whether the fused kernel can run here (Triton importable, a CUDA device)."""
    if not torch.cuda.is_available():
        return False
    try:
        _kernel()
    except Exception:  # no triton, or one that does not match this torch
        return False
    return True


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf


# tile sizes and launch shape of the fused kernel (bench/expert_update.py --sweep times alternatives)
DEFAULT_CONFIG = dict(BLOCK_P=128, BLOCK_Q=128, BLOCK_S=64, num_warps=8, num_stages=3)


def weight_grad_adamw_(a_SP: torch.Tensor, b_SQ: torch.Tensor, offsets_E: torch.Tensor, param_EPQ: torch.Tensor,
                       exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, update: ExpertUpdate,
                       config: dict | None = None) -> None:
    """param[e] (and its states) updated in place by AdamW with the gradient a[rows_e]^T @ b[rows_e] ([E, P, Q]).

    Rows are grouped by expert as in `grouped_mm` (offsets_E: cumulative row ends, int32). Experts without rows get a
    zero gradient, as in the unfused path (their states still decay and weight decay applies).
    """
    num_experts, P, Q = param_EPQ.shape
    fused = (triton_available() and param_EPQ.is_cuda and param_EPQ.is_contiguous() and exp_avg.is_contiguous()
             and exp_avg_sq.is_contiguous() and a_SP.stride(1) == 1 and b_SQ.stride(1) == 1)
    if not fused:
        grad = grouped_mm_weight_grad(a_SP, b_SQ, offsets_E, num_experts).to(param_EPQ.dtype)
        torch._fused_adamw_([param_EPQ], [grad], [exp_avg], [exp_avg_sq], [], [update.step], amsgrad=False,
                            maximize=False, **update.hyper())
        return
    config = config or DEFAULT_CONFIG
    grid = (-(-P // config["BLOCK_P"]), -(-Q // config["BLOCK_Q"]), num_experts)
    _kernel()[grid](a_SP, b_SQ, offsets_E, param_EPQ, exp_avg, exp_avg_sq, update.step, P, Q, a_SP.stride(0),
                    b_SQ.stride(0), float(update.lr), float(update.beta1), float(update.beta2), float(update.eps),
                    float(update.weight_decay), _log2(update.beta1), _log2(update.beta2), **config,
                    # fp32 inputs multiply in full precision, as torch's fp32 matmuls do by default (not TF32)
                    INPUT_PRECISION="ieee" if a_SP.dtype == torch.float32 else "tf32")
