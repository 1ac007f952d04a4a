"""Parallelism on PyTorch's own engine: one DeviceMesh, FSDP2 (+HSDP), expert parallelism, dispatchers.

    from trainer.parallel import ParallelConfig, parallelize
    model = parallelize(model, ParallelConfig(ep_size=2))      # under torchrun; a no-op shard-wise with one process

`MoEAutoModelForCausalLM.from_pretrained(name, parallel=ParallelConfig(...))` builds the model on the meta device and
loads each rank's shard straight from safetensors (`trainer.parallel.load`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.errors import UserError
from trainer.parallel.config import ParallelConfig

__all__ = ["ParallelConfig", "parallelize", "setup_mesh", "teardown"]

_MESHES: dict = {}


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def setup_mesh(cfg: ParallelConfig, num_experts: int | None = None):
    """The job's `ParallelMesh` for these sizes (built once per process and reused)."""
    from trainer.parallel.mesh import build_mesh, mesh_sizes

    sizes = mesh_sizes(cfg, dist.get_world_size(), num_experts)
    key = (sizes.dp_replicate, sizes.efsdp, sizes.ep)
    if key not in _MESHES:
        _MESHES[key] = build_mesh(cfg, _device_type(), num_experts)
    return _MESHES[key]


def _num_experts(model: torch.nn.Module) -> int | None:
    from trainer.models.base import num_experts

    return num_experts(model.config) if hasattr(model, "config") else None


def parallelize(model: torch.nn.Module, parallel_cfg, precision: str | None = None) -> torch.nn.Module:
    """Shard a built model with FSDP2 + EP over all ranks, or replicate it (`parallel.layout`), or only apply
    activation checkpointing with one process.

    parallel_cfg: a ParallelConfig or the recipe's `parallel` section. precision: the resolved train.precision
    (bf16-mixed -> bf16 compute in FSDP2); without it, bf16 compute is used for fp32 weights on CUDA only.
    A model that `from_pretrained(..., parallel=...)` already sharded is returned unchanged.
    """
    if getattr(model, "moe_parallel_mesh", None) is not None:
        return model
    if precision is None and not isinstance(parallel_cfg, ParallelConfig):
        param = next(model.parameters())
        precision = "bf16-mixed" if param.device.type == "cuda" and param.dtype == torch.float32 else "fp32"
    cfg = ParallelConfig.from_any(parallel_cfg, precision)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        if cfg.ep_size > 1:
            raise UserError(f"parallel.ep_size={cfg.ep_size} needs as many processes",
                            "launch with torchrun --nproc-per-node N (see docs/DISTRIBUTED.md) or set parallel.ep_size=1")
        from trainer.parallel.checkpointing import apply_checkpointing

        apply_checkpointing(model, cfg.activation_checkpointing)
        return model
    if cfg.layout == "replicate":
        return _replicate(model, cfg)
    from trainer.parallel.apply import apply_parallelism
    from trainer.parallel.dispatchers import make_dispatcher

    pmesh = setup_mesh(cfg, _num_experts(model))
    dispatcher = None
    if pmesh.sizes.ep > 1:
        hidden = getattr(model.config, "hidden_size", None)
        dispatcher = make_dispatcher(cfg.dispatcher, pmesh.ep.get_group(), _device_type(), hidden)
    return apply_parallelism(model, cfg, pmesh, dispatcher)


def _replicate(model: torch.nn.Module, cfg: ParallelConfig) -> torch.nn.Module:
    """`parallel.layout: replicate`: activation checkpointing, then the whole model on every rank with its AdamW
    state split over them (`trainer.parallel.replicate`; the in-backward optimizer averages the gradients)."""
    from trainer.parallel.checkpointing import apply_checkpointing
    from trainer.parallel.replicate import replicate

    cfg.check_layout_sizes()  # a recipe was checked when it loaded; a ParallelConfig built in code is checked here
    apply_checkpointing(model, cfg.activation_checkpointing)
    replicate(model, shard_optimizer=True)
    return model


def teardown() -> None:
    """Release communication buffers (DeepEP) before `destroy_process_group`; safe to call always."""
    import sys

    deepep = sys.modules.get("trainer.parallel.deepep")
    if deepep is not None:
        deepep.close_all()
