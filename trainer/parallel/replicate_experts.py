"""Expert parallelism inside a replicated model: each rank keeps only its share of every MoE layer's experts, and the
tokens travel to them (all-to-all or DeepEP); everything else stays replicated (`trainer.parallel.replicate`).

    replicate(model, shard_optimizer=True)      # equal parameters on every rank, gradient averaging marked
    split_experts(model, dispatcher="auto")     # then rank r keeps experts [r*E/n, (r+1)*E/n) of each MoE layer

Compared with replicating the experts too, no expert gradient or weight is ever communicated (the experts are ~90% of
a Qwen3-30B-A3B layer) and each rank's AdamW covers only its experts; in exchange each MoE layer sends its tokens'
rows to the experts' ranks and back, forward and backward. The non-expert parameters keep the replicas' averaging
(or sharded update) in the in-backward optimizer. An expert's gradient already sums the tokens of every rank (the
dispatch's backward brings them home), so the optimizer divides it by the group size instead of averaging it.

The all-to-all and DeepEP dispatchers size their buffers on the host, so the layers are then compiled without CUDA
graphs (`trainer.perf`); the all-gather dispatcher has static shapes and keeps them.
Parameters are plain tensors (the rank's experts), so this layout is for training steps and benchmarks: a state
dict holds only the rank's experts (checkpoints and export go through FSDP2's layouts, `trainer.parallel.apply`).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.parallel.apply import attach_dispatcher, experts_modules, rank_experts, stacked_expert_params
from trainer.parallel.replicate import replica_gradients


def split_experts(model: nn.Module, dispatcher: str = "auto") -> int:
    """Keep this rank's experts of every MoE layer of the replicated `model` and install the expert-parallel
    `dispatcher` ("auto", "alltoall", "allgather" or "deepep", as `parallel.dispatcher`); returns the number of MoE
    layers."""
    from trainer.parallel.dispatchers import make_dispatcher

    replicas = replica_gradients(model)
    if replicas is None:
        raise RuntimeError("split_experts() needs a replicated model: call trainer.parallel.replicate.replicate first")
    modules = experts_modules(model)
    world, rank = replicas.world, replicas.rank
    odd = [m.num_experts for m in modules if m.num_experts % world]
    if odd:
        raise ValueError(f"{odd[0]} experts do not split over {world} ranks: use a group size that divides them")
    device = next(model.parameters()).device
    for module in modules:
        for name, param in stacked_expert_params(module):
            own = nn.Parameter(rank_experts(param, rank, world), requires_grad=param.requires_grad)
            setattr(module, name, own)
            replicas.rank_local.add(own)
    shared = make_dispatcher(dispatcher, replicas.group, device.type, getattr(model.config, "hidden_size", None))
    attach_dispatcher(modules, shared)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the full expert tensors are gone
    return len(modules)
