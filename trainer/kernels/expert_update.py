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
from dataclasses import dataclass

import torch

from trainer.kernels.adamw import log2_beta
from trainer.kernels.triton_support import triton_loads_on_cuda
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
    from trainer.kernels.triton_adamw import grad_adamw_kernel

    return grad_adamw_kernel


@functools.cache
def triton_available() -> bool:
    """Whether the fused kernel can run here (Triton importable, a CUDA device)."""
    return triton_loads_on_cuda(_kernel)


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
                    float(update.weight_decay), log2_beta(update.beta1), log2_beta(update.beta2), **config,
                    # fp32 inputs multiply in full precision, as torch's fp32 matmuls do by default (not TF32)
                    INPUT_PRECISION="ieee" if a_SP.dtype == torch.float32 else "tf32")
