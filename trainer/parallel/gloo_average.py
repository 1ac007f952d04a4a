"""FSDP2 gradient averaging on gloo where gloo has no ReduceOp.AVG (torch 2.7).

FSDP2 averages fp32/bf16 gradients with the collective itself: `reduce_scatter(op=AVG)` and, with a replicate
dim (HSDP), `all_reduce(op=AVG)`. The gloo backend of torch 2.7 has no AVG: its all_reduce refuses it ("Cannot use
ReduceOp.AVG with Gloo") and its reduce_scatter sums instead, so every gradient came out world-size times too large
(the FSDP-only and EP x FSDP parity tests measured a relative difference of exactly 1.0 on two ranks). Later
releases give gloo AVG, and then nothing here changes anything.

Where a probe finds AVG refused, FSDP's divide-factor rule is made to take its fp16 path for gloo process groups on
CPU: SUM collectives, then one division by the data-parallel size. NCCL groups and CUDA tensors are untouched.
"""

from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.distributed as dist

logger = logging.getLogger("trainer.parallel")


@functools.cache
def gloo_refuses_avg() -> bool:
    """One all_reduce(AVG) of a single CPU float on the default group (collective: every rank calls it)."""
    if not dist.is_initialized() or "gloo" not in str(dist.get_backend()):
        return False
    try:
        dist.all_reduce(torch.zeros(1), op=dist.ReduceOp.AVG)
    except (RuntimeError, ValueError):  # refused locally, before any data moves: no rank is left waiting
        return True
    return False


def _is_gloo(group) -> bool:
    return group is not None and "gloo" in str(dist.get_backend(group))


def sum_then_divide_on_gloo() -> bool:
    """Patch torch 2.7's `_get_gradient_divide_factors` when gloo refuses AVG; True if the patch is (now) active."""
    if not gloo_refuses_avg():
        return False
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives

    original = collectives._get_gradient_divide_factors
    if getattr(original, "moe_sum_then_divide", False):
        return True
    if list(inspect.signature(original).parameters) != ["reduce_scatter_group", "all_reduce_group", "reduce_dtype",
                                                        "device_type"]:
        # Not the torch 2.7 rule (which returns (pre, post) factors): do not guess at another release's contract.
        logger.warning("gloo refuses ReduceOp.AVG but FSDP2's divide-factor rule is not torch 2.7's: "
                       "gradients on gloo may be summed instead of averaged")
        return False

    @functools.wraps(original)
    def divide_factors(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type=""):
        if device_type == "cpu" and _is_gloo(reduce_scatter_group):
            size = reduce_scatter_group.size() * (all_reduce_group.size() if all_reduce_group is not None else 1)
            return 1.0, float(size)  # a pre-factor (1: no division) selects SUM collectives; divide once after
        return original(reduce_scatter_group, all_reduce_group, reduce_dtype, device_type)

    divide_factors.moe_sum_then_divide = True
    collectives._get_gradient_divide_factors = divide_factors
    logger.info("gloo has no ReduceOp.AVG: FSDP2 sums gradients on gloo and divides by the data-parallel size")
    return True
