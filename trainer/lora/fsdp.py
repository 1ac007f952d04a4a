"""LoRA under FSDP2 (`parallel.ep_size=1`): what the sharded layout needs and what this torch can do.

The adapters are sharded with the layer that holds them: each decoder layer's `fully_shard` group holds its frozen
base weights and its trainable lora_A / lora_B, so the layer's all-gather brings both before its forward (the
routed experts' adapters are read as weights by the grouped-GEMM path, never called as modules, so a group of their
own would never be gathered). FSDP2 shards every parameter on its own and reduce-scatters only the gradients that
exist: the frozen base gets none, so only the adapters' gradients are reduced. The optimizer takes the parameters
with requires_grad (the adapters' shards). Under expert parallelism the expert adapters stay in that group too
(whole, in PEFT's layout); each rank computes its experts' slice of them (`trainer.lora.experts`).

One group per layer holds two dtypes when the base is bf16 (the adapters train in fp32). torch 2.7's FSDP2 demands
one original dtype per group over all parameters (2.7.1: "FSDP expects uniform original parameter dtype" at the first
forward); newer versions (2.13 tested) check the trainable parameters only. `groups_allow_frozen_dtypes` reads the
rule from torch's own check, so a bf16 base is refused exactly where it would fail.
"""

from __future__ import annotations

import inspect

import torch

from trainer.errors import UserError


def _init_mp_dtypes_source() -> str:
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    except ImportError:  # pragma: no cover (older module path)
        from torch.distributed._composable.fsdp._fsdp_param_group import FSDPParamGroup
    try:
        return inspect.getsource(FSDPParamGroup._init_mp_dtypes)  # noqa: SLF001
    except (OSError, TypeError):  # pragma: no cover (no sources shipped)
        return ""


def groups_allow_frozen_dtypes() -> bool:
    """Whether this torch's FSDP2 lets frozen parameters of one group have another dtype than the trainable ones
    (its uniform-dtype check covers trainable parameters only)."""
    return "requires_grad" in _init_mp_dtypes_source()


def check_sharded_lora(base_dtype: torch.dtype) -> None:
    """UserError for a LoRA layout this torch cannot shard: a non-fp32 base beside the fp32 adapters in one group."""
    if base_dtype != torch.float32 and not groups_allow_frozen_dtypes():
        raise UserError(f"lora.enabled=true with a {str(base_dtype).removeprefix('torch.')} base under FSDP2 needs a "
                        f"torch whose FSDP2 groups may mix frozen dtypes (torch {torch.__version__}'s cannot)",
                        "set model.dtype=float32 (train.precision=bf16-mixed keeps bf16 compute), upgrade torch, "
                        "or train in one process")
