"""AdamW update of one tensor in one Triton kernel, at close to the GPU's memory bandwidth.

    adamw_(param, grad, exp_avg, exp_avg_sq, step, lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0)

The same update as `torch._fused_adamw_` (decoupled weight decay, bias corrections from the device step counter, all
math in fp32, each tensor stored back in its own dtype). PyTorch's multi-tensor kernel launches a few hundred blocks
per call and reaches about half of an H200's bandwidth on bf16 tensors of hundreds of millions of elements (the
expert weights); one large grid per tensor streams them at close to the full bandwidth (`bench/adamw_kernel.py`
measures both). The update reads four tensors and writes three, so bandwidth is all that counts.

`shadow`: a second tensor written with the new parameter in its own dtype (the bf16 model weight of an fp32 master
copy), instead of a separate copy afterwards. `step` is a one-element fp32 tensor on the same device (the step
number being taken, starting at 1), read on the device so that no value goes to the host.

Only CUDA tensors that are contiguous and of the same size; `usable(...)` says whether a set of tensors qualifies.
"""

from __future__ import annotations

import functools
import math

import torch

from trainer.kernels.triton_support import blocks, triton_loads_on_cuda

# elements per program, warps: the fastest of bench/adamw_kernel.py --sweep on an H200 (bf16 and fp32 master)
DEFAULT_CONFIG = dict(BLOCK=1024, num_warps=4)
# other launch shapes to try end to end (`PerfOptions.adamw_launch`, "<elements>x<warps>"): alone the kernel is
# bandwidth-bound, but beside the backward's GEMMs the size of its programs decides how many SMs it takes from them
LAUNCH_SHAPES = ("default", "512x2", "512x4", "1024x2", "1024x8", "2048x4", "2048x8", "4096x8")


def launch_config(shape: str) -> dict:
    """The kernel's launch configuration for a `LAUNCH_SHAPES` name ("default" = DEFAULT_CONFIG)."""
    if shape == "default":
        return dict(DEFAULT_CONFIG)
    block, warps = shape.split("x")
    return dict(BLOCK=int(block), num_warps=int(warps))


@functools.cache
def _kernel():
    from trainer.kernels.triton_adamw import adamw_kernel

    return adamw_kernel


@functools.cache
def available() -> bool:
    """Whether Triton is importable and a CUDA device is present."""
    return triton_loads_on_cuda(_kernel)


def log2_beta(beta: float) -> float:
    """log2 of an AdamW beta as the kernels take it (their bias corrections are exp2(step * log2 beta))."""
    return math.log2(beta) if beta > 0 else -math.inf


def usable(*tensors: torch.Tensor | None) -> bool:
    """Whether these tensors (None skipped) can go through `adamw_`: CUDA, contiguous, one size, one device."""
    present = [t for t in tensors if t is not None]
    first = present[0]
    return available() and all(t.is_cuda and t.is_contiguous() and t.numel() == first.numel()
                               and t.device == first.device for t in present)


def adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           step: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
           shadow: torch.Tensor | None = None, skip: torch.Tensor | None = None,
           grad_scale: torch.Tensor | None = None, config: dict | None = None) -> None:
    """Update `param`, `exp_avg`, `exp_avg_sq` (and write `shadow`) in place, on the current CUDA stream; nothing
    is read or written where `skip` (a one-element fp32 tensor on the device) is non-zero; the gradient is divided
    by `grad_scale` (one fp32 element on the device: clipping without a pass of its own) when given."""
    n = param.numel()
    if n == 0:
        return
    config = config or DEFAULT_CONFIG
    grid = (blocks(n, config["BLOCK"]),)
    _kernel()[grid](param, grad, exp_avg, exp_avg_sq, shadow if shadow is not None else param, step,
                    skip if skip is not None else step, grad_scale if grad_scale is not None else step, n,
                    float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                    log2_beta(beta1), log2_beta(beta2),
                    HAS_SHADOW=shadow is not None, HAS_SKIP=skip is not None,
                    HAS_SCALE=grad_scale is not None, **config)
