"""Data parallelism by replication: every process holds the whole model and its optimizer state; gradients are
averaged across processes inside the backward, layer by layer, by the in-backward optimizer.

    replicate(model)                       # after init_process_group; before apply_optimizations / build_optimizer
    optimizer = trainer.perf.build_optimizer(model, PerfOptions.parse("best"))   # needs opt-in-bwd / opt-overlap

For a model that fits one GPU with room to spare (B1's 8.1B parameters on an H200) this keeps everything a one-GPU
step has, CUDA graphs included (FSDP2's hooks and resharding rule them out), and adds one all-reduce per gradient.
The optimizer issues each decoder layer's all-reduces as soon as the layer's gradients are complete, on its side
stream, so they run under the rest of the backward.

Requirements: plain (unsharded) parameters, every process producing gradients for the same parameters in the same
order (one model, one code path), one device per process. The parameters are broadcast from rank 0 once, so all
replicas start equal whatever their seeds.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

REPLICA_GROUP = "moe_replica_group"


def replicate(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Make `model` a replica over `group` (default: the world): equal parameters and buffers on every rank, and
    the mark that tells `trainer.perf.build_optimizer` to average gradients. Returns the group's size."""
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
    model.__dict__[REPLICA_GROUP] = group
    return dist.get_world_size(group)


def replica_group(model: torch.nn.Module) -> dist.ProcessGroup | None:
    """The group `model` is replicated over, or None."""
    return model.__dict__.get(REPLICA_GROUP)


def average_gradients(grads: list[torch.Tensor], group: dist.ProcessGroup) -> None:
    """Average each gradient in place across `group` (on the current stream): NCCL averages in the all-reduce
    itself; other backends (gloo) sum, after a division."""
    if dist.get_backend(group) == "nccl":
        for grad in grads:
            dist.all_reduce(grad, op=dist.ReduceOp.AVG, group=group)
        return
    world = dist.get_world_size(group)
    for grad in grads:
        grad.div_(world)
        dist.all_reduce(grad, group=group)
