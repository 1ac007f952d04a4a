"""The tests' training loop: `steps` steps of `trainer.step.TrainStep` (the step `moe train` runs) on fixed token ids.

    optimizer, losses = train_steps(model, perf_options("optimizer=overlap"), ids, steps=3, lr=1e-2)

No LR schedule (a constant lr), no clipping unless asked for, no weight decay: what differs between two runs is then
only what their perf options change.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.config import OptimConfig
from trainer.data import IGNORE_INDEX
from trainer.optim import AdamW, build_optimizer
from trainer.perf import PerfOptions
from trainer.runtime import Runtime
from trainer.step import TrainStep, step_stream


def runtime_for(model: torch.nn.Module, world_size: int = 1) -> Runtime:
    """The Runtime of `model`'s device and dtype, without autocast (every weight trains in its own dtype).
    `world_size` > 1: the step's token count is summed over the process group (a replicated model's ranks)."""
    param = next(model.parameters())
    precision = "bf16" if param.dtype == torch.bfloat16 else "fp32"
    rank = dist.get_rank() if world_size > 1 else 0
    return Runtime(param.device, rank, world_size, precision, param.dtype)


def micro_batch(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One micro-batch of rows `ids` [B, S]: targets = ids shifted left with the last position ignored, positions
    0..S-1 in every row (one sample per row)."""
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = ids[:, 1:]
    position_ids = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
    return {"input_ids": ids, "targets": targets, "position_ids": position_ids}


def train_steps(model: torch.nn.Module, options: PerfOptions, ids: torch.Tensor, steps: int, lr: float,
                world_size: int = 1, max_grad_norm: float = 0.0) -> tuple[AdamW, list[float]]:
    """Build the optimizer `options` asks for and take `steps` TrainSteps on the one micro-batch `ids`. Returns
    (optimizer, the steps' token-mean losses); held-back updates (`defer`) are applied before returning, so the
    parameters can be compared."""
    rt = runtime_for(model, world_size)
    batch = micro_batch(ids)
    with step_stream(options, rt.device):
        optimizer = build_optimizer(model, OptimConfig(lr=lr, max_grad_norm=max_grad_norm), options)
        step = TrainStep(model, optimizer, None, rt, options, max_grad_norm)
        losses = [step([batch]).fetch()["loss"] for _ in range(steps)]
        optimizer.flush()
    return optimizer, losses
