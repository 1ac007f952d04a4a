"""Data parallelism by replication: every process holds the whole model and its optimizer state; gradients are
averaged across processes inside the backward, layer by layer, by the in-backward optimizer.

    replicate(model)            # after init_process_group; before apply_optimizations / build_optimizer
    optimizer = build_optimizer(model, recipe.optim, options)   # trainer.optim; perf.optimizer=in-backward|overlap

For a model that fits one GPU with room to spare (B1's 8.1B parameters on an H200) this keeps everything a one-GPU
step has, CUDA graphs included (FSDP2's hooks and resharding rule them out), and adds one all-reduce per gradient.
The optimizer issues each decoder layer's all-reduces as soon as the layer's gradients are complete, on its side
stream, so they run under the rest of the backward. With `shard_optimizer=True` each rank keeps and updates only
its slice of each parameter (reduce-scatter, update, all-gather: `ReplicaGradients`). `split_experts`
(`trainer.parallel.replicate_experts`) then leaves each rank only its share of the experts.

Requirements: plain (unsharded) parameters, every process producing gradients for the same parameters in the same
order (one model, one code path), one device per process. The parameters are broadcast from rank 0 once, so all
replicas start equal whatever their seeds.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

REPLICA_GRADIENTS = "moe_replica_gradients"


def replicate(model: torch.nn.Module, group: dist.ProcessGroup | None = None, shard_optimizer: bool = False) -> int:
    """Make `model` a replica over `group` (default: the world): equal parameters and buffers on every rank, and
    the mark that tells `trainer.optim.build_optimizer` to average gradients (`shard_optimizer`: each rank
    updates and keeps AdamW state for only its slice of each parameter; see ReplicaGradients). Returns the group's
    size."""
    if not dist.is_initialized():
        raise RuntimeError("replicate() needs torch.distributed initialised (torchrun, or init_process_group)")
    sharded = [name for name, p in model.named_parameters() if type(p).__name__ == "DTensor"]
    if sharded:
        raise ValueError(f"replicate() needs plain parameters, but {sharded[0]} is sharded: use FSDP2 or replication, "
                         "not both")
    group = group or dist.group.WORLD
    source = dist.get_global_rank(group, 0) if group is not dist.group.WORLD else 0
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=source, group=group)
    model.__dict__[REPLICA_GRADIENTS] = ReplicaGradients(group, shard_optimizer)
    return dist.get_world_size(group)


def replica_gradients(model: torch.nn.Module) -> ReplicaGradients | None:
    """How `model`'s gradients are shared across its replicas, or None if it is not replicated."""
    return model.__dict__.get(REPLICA_GRADIENTS)


class ReplicaGradients:
    """How a replica's gradients reach its optimizer.

    Unsharded: each gradient is averaged in full (all-reduce) and every rank updates every parameter. Sharded (the
    optimizer state split across the replicas, as ZeRO-1): for each parameter whose first dimension divides by the
    group size, only this rank's rows of the averaged gradient are formed (reduce-scatter), only they are updated
    (their AdamW states are that slice's size), and the slices are all-gathered back into the full parameter
    afterwards. Same communication volume as the all-reduce, 1/world of the optimizer's memory traffic and state.

    In a state dict a slice's AdamW state is a DTensor `Shard(0)` of the parameter's shape over the replicas
    (`state_tensor`): the layout FSDP2's checkpoints have, so DCP reshards a checkpoint between the two layouts.
    """

    def __init__(self, group: dist.ProcessGroup, shard: bool):
        self.group, self.shard = group, shard
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        # parameters that differ by rank (each rank's own experts: trainer.parallel.replicate_experts): their
        # gradients already sum every rank's tokens, so they are divided by the group size and never communicated
        self.rank_local: set[torch.Tensor] = set()
        self._meshes: dict[str, object] = {}

    def _sharded(self, p: torch.Tensor) -> bool:
        return (self.shard and p not in self.rank_local and p.dim() > 0 and p.shape[0] % self.world == 0
                and p.is_contiguous())

    def view_of(self, p: torch.Tensor) -> torch.Tensor:
        """The part of `p` this rank updates: its rows (sharded), else the whole parameter."""
        if not self._sharded(p):
            return p.detach()
        rows = p.shape[0] // self.world
        return p.detach().narrow(0, self.rank * rows, rows)

    def state_tensor(self, p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """How optimizer state `local` (shaped like `view_of(p)`, sharing its memory) appears in a state dict: a
        DTensor `Shard(0)` of p's shape over the replicas for a sharded parameter, else `local` itself (equal on
        every rank)."""
        if not self._sharded(p):
            return local
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, self._mesh(local.device.type), [Shard(0)], run_check=False,
                                  shape=p.shape, stride=p.stride())

    def _mesh(self, device_type: str):
        if device_type not in self._meshes:
            from torch.distributed.device_mesh import DeviceMesh

            self._meshes[device_type] = DeviceMesh.from_group(self.group, device_type)
        return self._meshes[device_type]

    def gradients(self, params: list[torch.Tensor], grads: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Each parameter's averaged gradient for `view_of(p)` (on the current stream), from `grads` (default: the
        parameters' .grad; averaged in place)."""
        nccl = dist.get_backend(self.group) == "nccl"
        result = []
        for p, grad in zip(params, grads if grads is not None else [p.grad for p in params]):
            if p in self.rank_local:
                result.append(grad.div_(self.world))
                continue
            if not nccl:
                grad.div_(self.world)
            op = dist.ReduceOp.AVG if nccl else dist.ReduceOp.SUM
            if self._sharded(p):
                part = grad.new_empty((grad.shape[0] // self.world, *grad.shape[1:]))
                dist.reduce_scatter_tensor(part.view(-1), grad.reshape(-1), op=op, group=self.group)
                result.append(part)
            else:
                dist.all_reduce(grad, op=op, group=self.group)
                result.append(grad)
        return result

    def gather(self, params: list[torch.Tensor]) -> None:
        """After the update: every rank's slices back into the full sharded parameters."""
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        for p in params:
            if self._sharded(p):
                full = p.detach().view(-1)
                gather(full, self.view_of(p).view(-1), group=self.group)
