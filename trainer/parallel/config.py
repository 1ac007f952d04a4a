"""`ParallelConfig`: how a model is spread over the processes of a torchrun job.

    world = dp_replicate_size x dp_shard_size            (every rank is a data-parallel rank)
    dp_shard_size = efsdp x ep_size                       (expert parallelism borrows from the sharded data-parallel ranks)

Non-expert weights are FSDP2-sharded over dp_shard (and replicated over dp_replicate: HSDP); expert weights are split
over `ep` (dim 0, whole experts) and FSDP2-sharded over the `efsdp` ranks left. `layout: replicate` instead keeps the
whole model on every rank, averages the gradients in the backward and splits only the AdamW state over the ranks
(`trainer.parallel.replicate`). The same fields exist in the recipe's `parallel.*` section; `ParallelConfig.from_any`
accepts either object.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from trainer.errors import UserError

DISPATCHERS = ("auto", "alltoall", "allgather", "deepep")
LAYOUTS = ("fsdp", "replicate")
from trainer.parallel.checkpointing import MODES as CHECKPOINTING
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class ParallelConfig:
    """Mesh sizes, dispatcher and FSDP2 options. -1 for dp_shard_size means "all ranks left"."""

    # fsdp: FSDP2 (+ HSDP, + EP) shards the weights, gradients and AdamW state; replicate: every rank holds the whole
    # model (plain tensors, so CUDA graphs can replay the layers), gradients are averaged layer by layer inside the
    # backward by the in-backward optimizer, and each rank updates and keeps AdamW state for its slice (ZeRO-1).
    # For a model that fits one GPU with room to spare; needs perf.optimizer=in-backward|overlap.
    layout: Literal["fsdp", "replicate"] = "fsdp"
    ep_size: int = 1
    dp_shard_size: int = -1
    dp_replicate_size: int = 1
    dispatcher: Literal["auto", "alltoall", "allgather", "deepep"] = "auto"
    # recompute in the backward: none | full (every decoder layer) | attention (the attention sub-block: cheap to
    # recompute per byte saved, holds no router state) | moe (the MoE sub-block); `trainer.parallel.checkpointing`
    activation_checkpointing: Literal["none", "full", "attention", "moe"] = "none"
    # FSDP2 mixed precision: weights are all-gathered in param_dtype for compute (None: the master dtype itself),
    # gradients reduced in reduce_dtype. The master copy keeps the dtype the model was loaded in (fp32 by default).
    param_dtype: str | None = "bfloat16"
    reduce_dtype: str | None = "float32"
    # FSDP2: free each layer's gathered weights after its forward (true) or keep them until its backward (false:
    # one all-gather per step instead of two for the memory of every layer's gathered weights; `moe plan` lists both)
    reshard_after_forward: bool = True
    check_memory: bool = True  # on GPUs, refuse (before loading weights) a layout the planner says cannot fit

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise UserError(f"unknown parallel.layout '{self.layout}'", f"use one of {'|'.join(LAYOUTS)}")
        if self.dispatcher not in DISPATCHERS:
            raise UserError(f"unknown parallel.dispatcher '{self.dispatcher}'", f"use one of {'|'.join(DISPATCHERS)}")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise UserError(
                f"unknown parallel.activation_checkpointing '{self.activation_checkpointing}'",
                f"use one of {'|'.join(CHECKPOINTING)}",
            )
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if value is not None and value not in _DTYPES:
                raise UserError(f"parallel {name} '{value}' is not a dtype name", f"use one of {', '.join(_DTYPES)}")

    def check_layout_sizes(self) -> None:
        """UserError for sizes the layout has nothing to split with: `replicate` keeps every weight on every rank,
        so ep_size, dp_shard_size and dp_replicate_size stay at their defaults."""
        if self.layout != "replicate":
            return
        for name, default in (("ep_size", 1), ("dp_shard_size", -1), ("dp_replicate_size", 1)):
            if getattr(self, name) != default:
                raise UserError(f"parallel.layout=replicate keeps every weight on every rank, so parallel.{name}="
                                f"{getattr(self, name)} has nothing to split",
                                f"set parallel.{name}={default}, or parallel.layout=fsdp")

    @property
    def param_torch_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.param_dtype] if self.param_dtype else None

    @property
    def reduce_torch_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.reduce_dtype] if self.reduce_dtype else None

    @classmethod
    def from_any(cls, cfg, precision: str | None = None) -> ParallelConfig:
        """From this class, the recipe's `parallel` section, or a dict. `precision` (the recipe's resolved
        train.precision) picks the FSDP2 compute dtype: bf16-mixed -> bf16, fp32/bf16 -> the master dtype."""
        if isinstance(cfg, cls) and precision is None:
            return cfg
        if isinstance(cfg, dict):
            values = dict(cfg)
        else:
            names = {f.name for f in dataclasses.fields(cls)}
            values = {name: getattr(cfg, name) for name in names if hasattr(cfg, name)}
        if precision is not None:
            values["param_dtype"] = "bfloat16" if precision == "bf16-mixed" else None
        return cls(**values)
