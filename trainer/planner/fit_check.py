"""From a recipe to a planner request, and the start-up check `moe train` runs before it loads any weight."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from trainer.errors import UserError
from trainer.planner.hardware import GPU, gpu_preset, gpu_with_memory
from trainer.planner.layout import Layout, PlanOptions
from trainer.planner.model_shape import ModelShape, shape_from_config
from trainer.planner.model_source import load_model_config
from trainer.planner.search import best_fit, evaluate, plan

SKIP_ENV = "MOE_SKIP_MEMORY_CHECK"


def recipe_value(recipe: Any, dotted: str, default: Any = None) -> Any:
    """`section.key` from a trainer.config.Recipe (attributes) or a nested dict (raw YAML)."""
    node = recipe
    for part in dotted.split("."):
        if isinstance(node, dict):
            node = node.get(part, None)
        else:
            node = getattr(node, part, None)
        if node is None:
            return default
    return node


@dataclass(frozen=True)
class PlanRequest:
    """The model, the recipe's layout and the options. When the recipe's mesh is impossible on this many GPUs,
    `layout_error` says why and `layout` is the plain FSDP layout (ep 1, all ranks sharding) with the same batch."""

    shape: ModelShape
    layout: Layout
    options: PlanOptions
    layout_error: str | None = None


def request_from_recipe(recipe: Any, world_size: int, model_config: Any = None, gpu: GPU | None = None,
                        capacity_factor: float | None = None) -> PlanRequest:
    """Read only the keys the planner needs: model, data.seq_len, train.{micro_batch_size, grad_accum_steps,
    precision}, parallel.{ep_size, dp_shard_size, dp_replicate_size, dispatcher, activation_checkpointing},
    lora.{enabled, rank, targets}, perf.{fused_ce, fused_experts}."""
    if model_config is None:
        name = recipe_value(recipe, "model.name_or_path", "")
        model_config = load_model_config(name, recipe_value(recipe, "model.config_overrides", {}) or {})
        shape = shape_from_config(model_config, name=name)
    else:
        shape = shape_from_config(model_config, name=str(recipe_value(recipe, "model.name_or_path", "")))
    replicate = int(recipe_value(recipe, "parallel.dp_replicate_size", 1))
    dp_shard = int(recipe_value(recipe, "parallel.dp_shard_size", -1))
    if dp_shard == -1:
        if world_size % replicate:
            raise UserError(f"parallel.dp_replicate_size={replicate} does not divide {world_size} GPUs",
                            "choose a replicate size that divides the GPU count")
        dp_shard = world_size // replicate
    dispatcher = recipe_value(recipe, "parallel.dispatcher", "auto")
    if dispatcher == "auto":
        dispatcher = "alltoall"  # the planner assumes the dispatcher that runs everywhere
    checkpointing = recipe_value(recipe, "parallel.activation_checkpointing", "none")
    checkpointing = {True: "full", False: "none"}.get(checkpointing, checkpointing)
    batch = dict(world_size=world_size, micro_batch=int(recipe_value(recipe, "train.micro_batch_size", 1)),
                 seq_len=int(recipe_value(recipe, "data.seq_len", 4096)), checkpointing=str(checkpointing),
                 dispatcher=dispatcher,
                 reshard_after_forward=_as_bool(recipe_value(recipe, "parallel.reshard_after_forward", True)))
    ep_size = int(recipe_value(recipe, "parallel.ep_size", 1))
    layout_error = None
    try:
        if world_size % dp_shard:
            raise UserError(f"parallel.dp_shard_size={dp_shard} does not divide {world_size} GPUs",
                            "choose a sharding size that divides the GPU count")
        if shape.num_experts % ep_size:
            raise UserError(f"parallel.ep_size={ep_size} does not divide the {shape.num_experts} experts",
                            "choose an ep_size that divides the expert count")
        layout = Layout(ep_size=ep_size, dp_shard=dp_shard, **batch)
    except UserError as err:
        layout_error = str(err)
        layout = Layout(ep_size=1, dp_shard=world_size, **batch)
    options = PlanOptions(
        precision=str(recipe_value(recipe, "train.precision", "auto")),
        grad_accum_steps=int(recipe_value(recipe, "train.grad_accum_steps", 1)),
        capacity_factor=capacity_factor if capacity_factor is not None else PlanOptions.capacity_factor,
        adapter_params=_adapter_params(recipe, model_config),
        # what `moe train` runs on a GPU: its AdamW is always a fused kernel, and `perf: auto` turns both on there
        optimizer_fused=True,
        fused_ce=_perf_on(recipe, "perf.fused_ce"),
        fused_experts=_perf_on(recipe, "perf.fused_experts"),
    )
    return PlanRequest(shape, layout, options, layout_error)


def _perf_on(recipe: Any, key: str) -> bool:
    """A `perf` on/off/auto key as it resolves on CUDA (auto: on)."""
    value = recipe_value(recipe, key, "auto")
    return value is True or str(value) in ("auto", "on")


def _adapter_params(recipe: Any, model_config: Any) -> int | None:
    """LoRA's adapter parameter count for the recipe's `lora` section (None when it is off)."""
    if not _as_bool(recipe_value(recipe, "lora.enabled", False)):
        return None
    from trainer.config import LoraConfig
    from trainer.lora.plan import adapter_params

    lora = LoraConfig(rank=int(recipe_value(recipe, "lora.rank", LoraConfig.rank)),
                      targets=list(recipe_value(recipe, "lora.targets", None) or LoraConfig().targets))
    return adapter_params(model_config, lora)


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def _gpu_for(memory_gib: float) -> GPU:
    """Bandwidths of the closest preset, with the given memory size."""
    like = "H200-141GB" if memory_gib > 100 else "H100-80GB"
    preset = gpu_preset(like)
    return preset if abs(preset.memory_gib - memory_gib) < 0.05 else gpu_with_memory(memory_gib, like)


def _check_disabled(recipe: Any) -> bool:
    if os.environ.get(SKIP_ENV, "").lower() in ("1", "true", "yes"):
        return True
    return recipe_value(recipe, "parallel.check_memory", True) is False


def check_fits(recipe_cfg: Any, model_config: Any, world_size: int, gpu_mem_gib: float) -> None:
    """Raise UserError (one line, with the best layout that fits) when the recipe's layout cannot fit.

    Args:
        recipe_cfg: a trainer.config.Recipe (or the same nested dict).
        model_config: the HF config object or config.json dict of the model (None: read from the recipe).
        world_size: number of ranks (GPUs) in the job.
        gpu_mem_gib: memory of one GPU, e.g. torch.cuda.get_device_properties(0).total_memory / 2**30.
    Skipped when `parallel.check_memory` is false (if the recipe has that key) or MOE_SKIP_MEMORY_CHECK=1.
    """
    if _check_disabled(recipe_cfg):
        return
    request = request_from_recipe(recipe_cfg, world_size, model_config)
    if request.layout_error:
        raise UserError(f"the recipe's layout is impossible on {world_size} GPUs: {request.layout_error}")
    gpu = _gpu_for(gpu_mem_gib)
    mine = evaluate(request.shape, request.layout, gpu, request.options)
    if mine.fits:
        return
    how_to_skip = ("parallel.check_memory=false" if recipe_value(recipe_cfg, "parallel.check_memory") is not None
                   else f"{SKIP_ENV}=1")
    need = mine.memory.total_gib
    problem = (f"layout {mine.layout.describe()} needs about {need:.1f} GiB per GPU (peak at the {mine.memory.phase}, "
               f"plus {gpu.reserve_gib:g} GiB reserve and {gpu.fragmentation:.0%} fragmentation) but a GPU has "
               f"{gpu_mem_gib:.1f} GiB")
    best = best_fit(plan(request.shape, request.layout, gpu, request.options))
    if best is None:
        fix = f"no layout fits on {world_size} GPUs: use more GPUs or a shorter data.seq_len (or set {how_to_skip} to try anyway)"
    else:
        fix = (f"use {best.layout.overrides(request.layout)} (about {best.memory.total_gib:.1f} GiB, "
               f"{best.step.tokens_per_s:,.0f} tok/s/GPU estimated; see `moe plan`), or set {how_to_skip} to try anyway")
    raise UserError(problem, fix)
