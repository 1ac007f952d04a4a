"""Rank functions for the replication tests (run by harness.run_ranks in gloo processes)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import tiny_configs
from perf_options import perf_options
from trainer.config import OptimConfig
from trainer.models import MoEAutoModelForCausalLM
from trainer.optim import build_optimizer
from trainer.parallel.replicate import replica_gradients, replicate
from trainer.parallel.replicate_experts import split_experts
from trainer.perf import apply_optimizations
from training_loop import train_steps

IDS = torch.randint(0, tiny_configs.VOCAB, (4, 24), generator=torch.Generator().manual_seed(5))


def _model(seed: int):
    torch.manual_seed(seed)
    # no router aux loss: it is not linear in the batch, so replicas could not reproduce the full batch's value
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe(router_aux_loss_coef=0.0))
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


def _train(model, spec: tuple[str, ...], ids: torch.Tensor, steps: int, world_size: int = 1):
    """`steps` TrainSteps with the perf overrides `spec`; `world_size` > 1: a replica, the token mean over all."""
    options = perf_options(*spec)
    apply_optimizations(model, options)
    optimizer, _ = train_steps(model, options, ids, steps, lr=1e-2, world_size=world_size)
    return options.notes, optimizer


def replicas_train_like_one_process(spec: tuple[str, ...], steps: int = 3, shard_optimizer: bool = False,
                                    split: bool = False, dispatcher: str = "alltoall") -> dict:
    """Each rank starts from its own seed and trains on its half of the batch; rank 0 also trains one model alone on
    the whole batch. `split`: each rank keeps half of the experts (split_experts, all-to-all dispatch). Returns the
    worst relative difference to that model (experts gathered from both ranks) and a checksum of the parameters
    that every rank holds in full."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model(seed=rank)  # replicate() makes every rank start from rank 0's parameters
    replicate(model, shard_optimizer=shard_optimizer)
    if split:
        split_experts(model, dispatcher)
    rank_local = replica_gradients(model).rank_local
    rows = IDS.shape[0] // world
    notes, optimizer = _train(model, spec, IDS[rank * rows:(rank + 1) * rows], steps, world_size=world)
    full = {}
    for name, p in model.named_parameters():  # every rank joins each gather, in the same order
        if p in rank_local:
            parts = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(parts, p.detach().contiguous())
            full[name] = torch.cat(parts)
        else:
            full[name] = p.detach()
    result = {"notes": notes, "checksum": [float(p.double().sum()) for p in model.parameters() if p not in rank_local],
              "grads_left": sum(p.grad is not None for p in model.parameters()),
              "state_elements": optimizer.state_bytes() // (2 * 4),  # two fp32 moments per element
              "param_elements": sum(p.numel() for p in full.values()),
              "dispatchers": sorted({m.moe_dispatcher.name for m in model.modules()
                                     if getattr(m, "moe_dispatcher", None) is not None}),
              "graph_breaks": sum(counters["graph_break"].values())}
    if rank == 0:
        alone = _model(seed=0)
        _train(alone, spec, IDS, steps)
        worst, moved = 0.0, 0.0
        for name, a in alone.named_parameters():
            worst = max(worst, ((full[name] - a).norm() / a.norm().clamp_min(1e-30)).item())
        for name, a in _model(seed=0).named_parameters():
            moved = max(moved, (full[name] - a).abs().max().item())
        result.update(worst_rel=worst, moved=moved)
    return result


def replicated_model_refuses_an_optimizer_that_does_not_average() -> str:
    model = _model(seed=0)
    replicate(model)
    try:
        build_optimizer(model, OptimConfig(), perf_options("optimizer=after-backward"))
    except ValueError as err:
        return str(err)
    return ""
