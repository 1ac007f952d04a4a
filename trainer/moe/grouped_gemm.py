"""Grouped GEMM over experts: rows [S, K] grouped by expert x weights [E, K, N] -> [S, N].

Also the per-expert weight-gradient form: rows [S, K] and gradients [S, N] -> [E, K, N] (x[rows_e]^T @ g[rows_e]).

On Hopper (and on Ampere+ with torch >= 2.9) this is one `grouped_mm` launch; elsewhere (CPU, older GPUs, torch
builds without the op) a reference loop over experts computes the same product. Offsets are the cumulative row
counts per expert (int32, [E]); rows past `offsets[-1]` are never read.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device_type: str, device_index: int | None = None) -> bool:
    """Whether a fused grouped GEMM kernel exists for this device and torch build."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device_index)
    has_public_op = hasattr(torch.nn.functional, "grouped_mm")
    has_private_op = hasattr(torch, "_grouped_mm")
    torch_major_minor = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if major >= 9:
        return has_public_op or has_private_op
    return major >= 8 and torch_major_minor >= (2, 9) and (has_public_op or has_private_op)


def _fused_grouped_mm(x_SK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    op = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return op(x_SK, w_EKN, offs=offsets_E)


def _looped_grouped_mm(x_SK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """Reference: one matmul per expert with rows (needs the offsets on the host)."""
    out_SN = x_SK.new_zeros(x_SK.shape[0], w_EKN.shape[-1])
    ends = offsets_E.tolist()
    start = 0
    for expert, end in enumerate(ends):
        if end > start:
            out_SN[start:end] = x_SK[start:end] @ w_EKN[expert]
        start = end
    return out_SN


def grouped_mm(x_SK: torch.Tensor, w_EKN: torch.Tensor, offsets_E: torch.Tensor, *, force_loop: bool = False) -> torch.Tensor:
    """Row-grouped matmul: rows offsets[e-1]:offsets[e] of x_SK times w_EKN[e]. Returns [S, N] in w's dtype."""
    x_SK = x_SK.to(w_EKN.dtype)
    if not force_loop and grouped_mm_supported(x_SK.device.type, x_SK.device.index):
        return _fused_grouped_mm(x_SK, w_EKN, offsets_E)
    return _looped_grouped_mm(x_SK, w_EKN, offsets_E)


def _looped_weight_grad(a_SK: torch.Tensor, b_SN: torch.Tensor, offsets_E: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Reference: one a^T @ b per expert over its rows; experts without rows get zeros."""
    out_EKN = a_SK.new_zeros(num_groups, a_SK.shape[1], b_SN.shape[1])
    start = 0
    for expert, end in enumerate(offsets_E.tolist()):
        if end > start:
            out_EKN[expert] = a_SK[start:end].t() @ b_SN[start:end]
        start = end
    return out_EKN


def grouped_mm_weight_grad(
    a_SK: torch.Tensor, b_SN: torch.Tensor, offsets_E: torch.Tensor, num_groups: int, *, force_loop: bool = False
) -> torch.Tensor:
    """Per-group a[rows_e]^T @ b[rows_e] -> [E, K, N] (rows grouped as in `grouped_mm`); a and b share a dtype.

    This is the weight gradient of `grouped_mm`: with a = layer input rows and b = output-gradient rows it is
    dW [E, in, out]; with the two swapped it is dW^T [E, out, in], HF's parameter layout.
    """
    if not force_loop and grouped_mm_supported(a_SK.device.type, a_SK.device.index):
        return _fused_grouped_mm(a_SK.t(), b_SN, offsets_E)  # 2D x 2D with offsets along the contraction dim
    return _looped_weight_grad(a_SK, b_SN, offsets_E, num_groups)
