"""One DeviceMesh for the whole job, with named dimensions.

    dims:   ("dp_replicate", "efsdp", "ep")      ep innermost: an EP group is consecutive ranks, i.e. one node's NVLink
    flat:   "dp_shard" = efsdp x ep               non-expert weights are FSDP2-sharded over it
            "dp"       = dp_replicate x efsdp x ep every rank: the data-parallel group (loss and token counts)

Expert weights are DTensors `Shard(0)` over "ep" and FSDP2-sharded over ("dp_replicate", "efsdp"); everything else
is FSDP2-sharded over ("dp_replicate", "dp_shard"). Tensor/context parallel dims would slot in after "ep".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.errors import UserError
from trainer.parallel.config import ParallelConfig


@dataclass
class MeshSizes:
    dp_replicate: int
    efsdp: int
    ep: int

    @property
    def dp_shard(self) -> int:
        return self.efsdp * self.ep

    @property
    def world(self) -> int:
        return self.dp_replicate * self.efsdp * self.ep


def mesh_sizes(cfg: ParallelConfig, world_size: int, num_experts: int | None = None) -> MeshSizes:
    """Resolve -1 and check that the sizes fit the world and the experts (UserError otherwise)."""
    if cfg.ep_size < 1 or cfg.dp_replicate_size < 1:
        raise UserError(
            f"parallel.ep_size={cfg.ep_size} and parallel.dp_replicate_size={cfg.dp_replicate_size} must be >= 1",
            "set them to 1 or more",
        )
    if world_size % cfg.dp_replicate_size:
        raise UserError(
            f"parallel.dp_replicate_size={cfg.dp_replicate_size} does not divide the world size {world_size}",
            "choose a dp_replicate_size that divides the number of processes",
        )
    dp_shard = cfg.dp_shard_size if cfg.dp_shard_size != -1 else world_size // cfg.dp_replicate_size
    if dp_shard * cfg.dp_replicate_size != world_size:
        raise UserError(
            f"dp_replicate_size x dp_shard_size = {cfg.dp_replicate_size} x {dp_shard} but the world size is {world_size}",
            "set parallel.dp_shard_size=-1 (all ranks left) or make the product equal the number of processes",
        )
    if dp_shard % cfg.ep_size:
        raise UserError(
            f"parallel.ep_size={cfg.ep_size} does not divide the {dp_shard} sharded data-parallel ranks "
            f"(world size {world_size})",
            "choose an ep_size that divides world_size / dp_replicate_size",
        )
    if num_experts is not None and num_experts % cfg.ep_size:
        raise UserError(
            f"parallel.ep_size={cfg.ep_size} does not divide the model's {num_experts} experts",
            "choose an ep_size that divides the number of experts",
        )
    return MeshSizes(cfg.dp_replicate_size, dp_shard // cfg.ep_size, cfg.ep_size)


@dataclass
class ParallelMesh:
    """The job's mesh and the sub-meshes each kind of weight is sharded over."""

    mesh: DeviceMesh
    sizes: MeshSizes
    dp_shard_mesh: DeviceMesh | None = None  # the flattened meshes as `_flatten` returned them (newer torch
    dp_mesh: DeviceMesh | None = None  # deprecates slicing flattened dims out of the root mesh)

    @property
    def ep(self) -> DeviceMesh:
        return self.mesh["ep"]

    @property
    def dense_fsdp(self) -> DeviceMesh:
        """Non-expert weights: HSDP over (dp_replicate, dp_shard), or plain FSDP over dp_shard."""
        if self.sizes.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.dp_shard_mesh if self.dp_shard_mesh is not None else self.mesh["dp_shard"]

    @property
    def expert_fsdp(self) -> DeviceMesh:
        """Expert weights: HSDP over (dp_replicate, efsdp), or plain FSDP over efsdp (may be of size 1)."""
        return self.mesh["dp_replicate", "efsdp"] if self.sizes.dp_replicate > 1 else self.mesh["efsdp"]

    @property
    def dp(self) -> DeviceMesh:
        return self.dp_mesh if self.dp_mesh is not None else self.mesh["dp"]

    @property
    def ep_rank(self) -> int:
        return self.ep.get_local_rank()


def build_mesh(cfg: ParallelConfig, device_type: str, num_experts: int | None = None) -> ParallelMesh:
    """`init_device_mesh` over all ranks of the (already initialised) default process group."""
    sizes = mesh_sizes(cfg, dist.get_world_size(), num_experts)
    mesh = init_device_mesh(
        device_type, (sizes.dp_replicate, sizes.efsdp, sizes.ep), mesh_dim_names=("dp_replicate", "efsdp", "ep")
    )
    dp_shard = mesh["efsdp", "ep"]._flatten("dp_shard")  # noqa: SLF001 (the torch 2.7..2.13 way to merge dims)
    dp = mesh["dp_replicate", "efsdp", "ep"]._flatten("dp")  # noqa: SLF001
    return ParallelMesh(mesh, sizes, dp_shard, dp)
