"""Apply expert parallelism, activation checkpointing and FSDP2 to a HF model (meta or materialised).

Order (each step assumes the previous one):
1. experts: every stacked expert tensor [E, ...] becomes a DTensor `Shard(0)` over the "ep" mesh dim (this rank keeps
   experts [r*E/ep, (r+1)*E/ep)), and the experts module gets the EP dispatcher;
2. activation checkpointing (`trainer.parallel.checkpointing`);
3. FSDP2: each experts module over the expert-FSDP mesh (gradients divided by the whole data-parallel size: expert
   gradients already hold every rank's tokens), each block over the dense mesh, then the root (embeddings, head).
Parameter names never change, so state dicts, DCP and HF export see the plain HF names.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from trainer.errors import UserError
from trainer.parallel.checkpointing import apply_checkpointing, decoder_layers
from trainer.parallel.config import ParallelConfig
from trainer.parallel.gloo_average import sum_then_divide_on_gloo
from trainer.parallel.mesh import ParallelMesh

logger = logging.getLogger("trainer.parallel")

try:  # torch >= 2.6 exports FSDP2 here
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:  # pragma: no cover
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard


def experts_modules(model: nn.Module) -> list[nn.Module]:
    """Modules holding stacked expert tensors: an int `num_experts` and a 3-D parameter with that many rows."""
    found = []
    for module in model.modules():
        num_experts = getattr(module, "num_experts", None)
        if not isinstance(num_experts, int):
            continue
        params = list(module.parameters(recurse=False))
        if any(p.dim() == 3 and p.shape[0] == num_experts for p in params):
            found.append(module)
    return found


def stacked_expert_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """An experts module's own [E, ...] parameters (one row per expert), with their names."""
    return [(name, p) for name, p in module.named_parameters(recurse=False)
            if p.dim() and p.shape[0] == module.num_experts]


def rank_experts(param: torch.Tensor, rank: int, ranks: int) -> torch.Tensor:
    """Rank `rank`'s experts of an [E, ...] tensor split over `ranks`: rows [rank*E/ranks, (rank+1)*E/ranks), in
    memory of their own (a meta tensor stays meta)."""
    per_rank = param.shape[0] // ranks
    local = param.detach()[rank * per_rank : (rank + 1) * per_rank]
    return local if local.is_meta else local.clone()  # do not keep the full tensor alive through a view


def attach_dispatcher(modules: list[nn.Module], dispatcher) -> None:
    """Serve every MoE layer in `modules` with the expert-parallel `dispatcher` (DeepEP: a per-layer view)."""
    per_layer = getattr(dispatcher, "for_layer", None)  # DeepEP keeps a per-layer replay slot
    for layer_index, module in enumerate(modules):
        module.moe_dispatcher = per_layer(layer_index) if per_layer is not None else dispatcher


def shard_experts(module: nn.Module, pmesh: ParallelMesh) -> None:
    """Replace each [E, ...] parameter by a DTensor `Shard(0)` over "ep" holding this rank's E/ep experts."""
    for name, param in stacked_expert_params(module):
        if isinstance(param, DTensor):
            continue
        local = rank_experts(param, pmesh.ep_rank, pmesh.sizes.ep)
        dtensor = DTensor.from_local(local, pmesh.ep, [Shard(0)], run_check=False)
        setattr(module, name, nn.Parameter(dtensor, requires_grad=param.requires_grad))


def _divide_expert_gradients(module: nn.Module, ep_size: int, world_size: int) -> None:
    """Expert gradients must be divided by the whole data-parallel size (each rank's experts already summed every
    rank's tokens through the all-to-all backward), FSDP divides by its expert mesh only: divide by ep on top.

    Done in FSDP's post-reduce hook rather than with a custom divide factor: that needs NCCL's PREMUL_SUM (absent
    on gloo), and with an expert-FSDP group of one rank some torch versions apply the factor twice."""
    set_hook = getattr(module, "set_all_reduce_hook", None)
    if set_hook is not None:
        set_hook(lambda reduced: reduced.div_(ep_size))
        return
    setter = getattr(module, "set_gradient_divide_factor", None) or module.set_reduce_scatter_divide_factor
    setter(float(world_size))


def apply_parallelism(model: nn.Module, cfg: ParallelConfig, pmesh: ParallelMesh, dispatcher) -> nn.Module:
    """Shard `model` in place (steps 1-3 above) and return it. `dispatcher` serves every MoE layer."""
    experts = experts_modules(model)
    if pmesh.sizes.ep > 1:
        for module in experts:
            shard_experts(module, pmesh)
        attach_dispatcher(experts, dispatcher)
    apply_checkpointing(model, cfg.activation_checkpointing)
    layers = decoder_layers(model)

    if sum_then_divide_on_gloo() and pmesh.sizes.dp_replicate > 1:  # torch 2.7: gloo has no AVG (gloo_average)
        raise UserError(f"parallel.dp_replicate_size={pmesh.sizes.dp_replicate} (HSDP) on gloo needs torch >= 2.8 "
                        f"(torch {torch.__version__}'s FSDP2 cannot all-reduce CPU gradients)",
                        "set parallel.dp_replicate_size=1, or train on GPUs (NCCL)")
    mp_policy = MixedPrecisionPolicy(param_dtype=cfg.param_torch_dtype, reduce_dtype=cfg.reduce_torch_dtype)
    dense = {"mesh": pmesh.dense_fsdp, "mp_policy": mp_policy}
    for layer in layers:
        if pmesh.sizes.ep > 1:
            for module in experts_modules(layer):
                fully_shard(module, mesh=pmesh.expert_fsdp, mp_policy=mp_policy,
                            reshard_after_forward=cfg.reshard_after_forward)
                _divide_expert_gradients(module, pmesh.sizes.ep, pmesh.sizes.world)
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward, **dense)
    fully_shard(model, **dense)  # embeddings, final norm, head; the root keeps its weights gathered after forward
    model.moe_parallel_mesh = pmesh
    model.moe_parallel_config = cfg
    return model
