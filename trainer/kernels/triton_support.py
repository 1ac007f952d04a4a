"""Whether a lazily loaded Triton kernel can run here, and the launch-grid arithmetic the kernels share."""

from __future__ import annotations

from typing import Callable

import torch


def triton_loads_on_cuda(load: Callable[[], object]) -> bool:
    """True when a CUDA device is present and `load()` (which imports Triton and defines a kernel) succeeds."""
    if not torch.cuda.is_available():
        return False
    try:
        load()
    except Exception:  # no triton, or one that does not match this torch
        return False
    return True


def blocks(n: int, block: int) -> int:
    """Programs needed to cover `n` elements at `block` per program (ceil division)."""
    return -(-n // block)
