"""Rank-side bodies of the distributed tests (imported by the spawned processes)."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

import tiny_configs
from trainer.models import MoEAutoModelForCausalLM
from trainer.parallel import ParallelConfig, parallelize

SEQ = 16
ROWS_PER_RANK = 2


def random_model(config, seed: int = 0):
    """The fast single-process model with every weight random (HF zero-inits some router weights)."""
    torch.manual_seed(seed)
    model = MoEAutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(std=0.2)
    return model


def _routing_override(kind: str):
    """Forward hook on routers that rewrites the expert choice (same rule in both models)."""

    def hook(module, inputs, output):
        logits, weights, index = output
        if kind == "few_experts":  # every token picks experts 0 and 1: all other experts get no tokens
            index = torch.stack([torch.zeros_like(index[:, 0]), torch.ones_like(index[:, 1])], dim=1)
        elif kind == "skewed":  # nearly every token's first choice is expert 5
            first = torch.where(torch.arange(index.shape[0]) % 8 == 0, index[:, 0], torch.full_like(index[:, 0], 5))
            index = torch.stack([first, index[:, 1]], dim=1)
        return logits, weights, index

    return hook


def _routers(model):
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def compare_step(reference, sharded, ids, **row_inputs) -> tuple[tuple[float, float], float]:
    """Forward + backward of the whole batch on the unsharded reference and of this rank's rows on the sharded
    model (`row_inputs`, e.g. position_ids, are split by row like `ids`). Returns (reference loss, sharded loss
    averaged over ranks) and the worst relative gradient difference over the parameters."""
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = ids.shape[0] // world
    mine = slice(rank * rows, (rank + 1) * rows)
    ref_loss = reference(ids, labels=ids, **row_inputs).loss
    ref_loss.backward()
    loss = sharded(ids[mine], labels=ids[mine], **{k: v[mine] for k, v in row_inputs.items()}).loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    ref_grads = dict(reference.named_parameters())
    worst = 0.0
    for name, param in sharded.named_parameters():
        ref_grad, grad = ref_grads[name].grad, _full(param.grad)
        worst = max(worst, ((grad - ref_grad).norm() / ref_grad.norm().clamp_min(1e-30)).item())
    return (ref_loss.item(), mean_loss.item() / world), worst


def ep_parity(parallel: dict, steps: list[str], num_experts: int = 8) -> dict:
    """Train `len(steps)` AdamW steps sharded and unsharded on the same global batches; return per-step loss
    pairs and the worst relative gradient difference (all ranks check; rank 0's numbers are returned)."""
    world = dist.get_world_size()
    config = tiny_configs.qwen3_moe(num_experts=num_experts)
    reference = random_model(config)
    sharded = parallelize(copy.deepcopy(reference), ParallelConfig(**parallel, param_dtype=None))
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    opt_sharded = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    losses, worst_grad = [], 0.0
    for step, kind in enumerate(steps):
        handles = []
        if kind != "random":
            for model in (reference, sharded):
                handles += [r.register_forward_hook(_routing_override(kind)) for r in _routers(model)]
        ids = torch.randint(0, tiny_configs.VOCAB, (world * ROWS_PER_RANK, SEQ), generator=torch.Generator().manual_seed(step))
        step_losses, step_worst = compare_step(reference, sharded, ids)
        losses.append(step_losses)
        worst_grad = max(worst_grad, step_worst)
        for h in handles:
            h.remove()
        opt_ref.step()
        opt_sharded.step()
        opt_ref.zero_grad()
        opt_sharded.zero_grad()
    return {"losses": losses, "worst_grad_rel": worst_grad}


def ep_parity_many(layouts: list[dict], steps: list[str]) -> list[dict]:
    """`ep_parity` for several mesh layouts in one set of processes (process start-up dominates the test time)."""
    return [ep_parity(layout, steps) for layout in layouts]


def export_matches_single_process(directory: str, parallel: dict) -> dict:
    """Load `directory/original` sharded, check the loss against one process, export to `directory/sharded`."""
    import os

    rank = dist.get_rank()
    original = os.path.join(directory, "original")
    model = MoEAutoModelForCausalLM.from_pretrained(original, parallel=ParallelConfig(**parallel, param_dtype=None))
    reference = MoEAutoModelForCausalLM.from_pretrained(original)
    ids = torch.randint(0, tiny_configs.VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        loss, ref_loss = model(ids, labels=ids).loss.item(), reference(ids, labels=ids).loss.item()
    model.save_pretrained(os.path.join(directory, "sharded"), max_shard_size="20KB")
    model.save_pretrained(os.path.join(directory, "sharded_single_file"))
    return {"rank": rank, "loss": loss, "ref_loss": ref_loss}


def dcp_reshard(directory: str) -> dict:
    """Train one step under EP=2, save model + optimizer with DCP, load into an FSDP-only (EP=1) model and an
    EP=2 model again; return whether every gathered weight and optimizer moment came back equal."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    rank = dist.get_rank()
    base = random_model(tiny_configs.qwen3_moe())

    def sharded(ep_size):
        model = parallelize(copy.deepcopy(base), ParallelConfig(ep_size=ep_size, param_dtype=None))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    model, optimizer = sharded(2)
    ids = torch.randint(0, tiny_configs.VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(rank))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=directory)
    expected = {n: _full(p).clone() for n, p in model.named_parameters()}
    expected_moments = {n: _full(s["exp_avg"]).clone() for n, s in
                        zip([n for n, _ in model.named_parameters()], optimizer.state.values())}
    equal = {}
    for ep_size in (1, 2):
        other, other_opt = sharded(ep_size)
        other(ids, labels=ids).loss.backward()  # materialise optimizer state to load into
        other_opt.step()
        state = {"model": get_model_state_dict(other), "optim": get_optimizer_state_dict(other, other_opt)}
        dcp.load(state, checkpoint_id=directory)
        set_model_state_dict(other, state["model"])
        set_optimizer_state_dict(other, other_opt, state["optim"])
        names = [n for n, _ in other.named_parameters()]
        weights_ok = all(torch.equal(_full(p), expected[n]) for n, p in other.named_parameters())
        moments_ok = all(torch.equal(_full(s["exp_avg"]), expected_moments[n])
                         for n, s in zip(names, other_opt.state.values()))
        equal[f"ep{ep_size}"] = weights_ok and moments_ok
    return equal


def optimizer_in_backward_matches(parallel: dict, steps: int = 3, spec: tuple[str, ...] = ("optimizer=in-backward",)
                                  ) -> dict:
    """Sharded model: `trainer.optim.AdamW` as the perf overrides `spec` say (in-backward: stepped from FSDP2's
    post-reduce-scatter hooks; after-backward: its own `step()`), vs torch's AdamW after the backward. Returns the
    worst relative parameter difference after `steps` steps and how many gradients the backward left."""
    from perf_options import perf_options
    from trainer.config import OptimConfig
    from trainer.optim import build_optimizer

    world = dist.get_world_size()
    base = random_model(tiny_configs.qwen3_moe())
    reference = parallelize(copy.deepcopy(base), ParallelConfig(**parallel, param_dtype=None))
    stepped = parallelize(copy.deepcopy(base), ParallelConfig(**parallel, param_dtype=None))
    options = perf_options(*spec)
    models = [(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                            weight_decay=0.0)),
              (stepped, build_optimizer(stepped, OptimConfig(lr=1e-2, max_grad_norm=0.0), options))]
    grads_left = 0
    for step in range(steps):
        ids = torch.randint(0, tiny_configs.VOCAB, (world * ROWS_PER_RANK, SEQ),
                            generator=torch.Generator().manual_seed(step))
        rows = slice(dist.get_rank() * ROWS_PER_RANK, (dist.get_rank() + 1) * ROWS_PER_RANK)
        for model, optimizer in models:
            model(ids[rows], labels=ids[rows]).loss.backward()
            if model is stepped:
                grads_left += sum(p.grad is not None for p in model.parameters())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    after = dict(reference.named_parameters())
    worst = 0.0
    for name, param in stepped.named_parameters():
        a, b = _full(after[name].detach()), _full(param.detach())
        worst = max(worst, ((a - b).norm() / a.norm().clamp_min(1e-30)).item())
    moved = max((_full(p.detach()) - _full(q.detach())).abs().max().item()
                for p, q in zip(base.parameters(), stepped.parameters()))
    return {"worst_rel": worst, "grads_left": grads_left, "notes": options.notes, "moved": moved}
