"""Where the job runs: device, process group, precision and seeds, decided once at start-up."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from trainer.config import Recipe


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    precision: str  # fp32 | bf16-mixed | bf16 (auto resolved)
    param_dtype: torch.dtype  # dtype of the trainable (master) weights
    control_group: object = None  # a gloo group for host-side flags (no CUDA stream involved), world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """bf16 autocast for bf16-mixed (fp32 master weights, bf16 matmuls); a no-op otherwise."""
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(value)
        return value

    def any_rank(self, flag: int) -> int:
        """1 if `flag` is set on any rank (every rank gets the same answer). On the host (gloo), so asking does not
        wait for the GPU work queued so far."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([flag], dtype=torch.int32)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control_group)
        return int(value.item())


def setup_runtime(recipe: Recipe) -> Runtime:
    """Initialise the process group (under torchrun), pick the device, resolve precision, seed every generator."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0

    precision, param_dtype = resolve_precision(recipe, device)
    seed_everything(recipe.train.seed)
    control = None
    if world_size > 1:
        control = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return Runtime(device, rank, world_size, precision, param_dtype, control)


def resolve_precision(recipe: Recipe, device: torch.device) -> tuple[str, torch.dtype]:
    """(train.precision with auto resolved, the weights' dtype): auto is bf16-mixed on CUDA (fp32 weights, bf16
    autocast) and fp32 elsewhere; model.dtype auto follows the precision (bfloat16 only for precision bf16)."""
    precision = recipe.train.precision
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" else "fp32"
    dtype_name = recipe.model.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if precision == "bf16" else "float32"
    return precision, getattr(torch, dtype_name)


def accelerator_memory_gib(rt: Runtime) -> float | None:
    """Total memory of this rank's GPU in GiB, or None on CPU (where no memory plan applies)."""
    if rt.device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(rt.device).total_memory / 2**30


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initialisation everywhere (sharding then splits it)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def parallelize(model: torch.nn.Module, parallel_cfg, rt: Runtime) -> torch.nn.Module:
    """The seam to `trainer.parallel`: FSDP2 + EP over the job's mesh, activation checkpointing, compile.

    With one process only checkpointing/compile apply; a model already sharded while loading is returned as is.
    Gradient reductions average over all ranks (the loss is scaled to match, see trainer.train).
    """
    from trainer.parallel import parallelize as apply_parallel

    return apply_parallel(model, parallel_cfg, precision=rt.precision)
