"""Speed and memory options of the training step: the recipe's `perf` section resolved for the device, and the model
patches it implies.

    options = resolve_perf(recipe.perf, device, world_size=1)   # every `auto` settled: PerfOptions
    notes = apply_optimizations(model, options)                  # patches modules in place; what ran / fell back

The keys and their meaning live in `trainer.config.PerfConfig` (the only vocabulary: the benchmark's variants are
lists of recipe overrides too). `auto` picks what pays on the device and keeps the recipe's semantics: the
in-backward optimizers, which rule out clipping and accumulation, are chosen only when the recipe asks for them.
The step that uses these options is `trainer.step.TrainStep`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.graph_priority import capture_graphs_at_high_priority
from trainer.models.aux_loss import use_sync_free_aux_loss
from trainer.models.output_capture import compile_friendly_output_capture
from trainer.models.stable_block_masks import keep_block_masks_in_place
from trainer.moe.experts import IMPLEMENTATION_NAME as EXPERTS_IMPLEMENTATION
from trainer.parallel.apply import experts_modules, stacked_expert_params
from trainer.parallel.checkpointing import decoder_layers
from trainer.parallel.replicate import replica_gradients

IN_BACKWARD = ("in-backward", "overlap")


@dataclass
class PerfOptions:
    """The resolved options (no `auto` left); `notes` collects what was applied and what fell back, and why."""

    fused_ce: bool = False
    fused_experts: bool = False
    kernels: str = "torch"  # torch | liger
    compile: str = "off"  # off | layers | layers-graphs
    optimizer: str = "after-backward"  # after-backward | in-backward | overlap
    adamw: str = "torch"  # torch | triton
    defer: str = "none"  # none | head | 1..4 | all (layers held back to the next forward, with the head)
    grad_norm: str = "after-backward"  # after-backward | in-backward (trainer.parallel.grad_norm.GradNormInBackward)
    graph_priority: str = "default"  # default | high | auto (settled by apply_optimizations)
    step_priority: str = "default"  # default | high | auto (settled by apply_optimizations)
    prefetch: bool = False
    notes: list[str] = field(default_factory=list, compare=False)

    @property
    def in_backward(self) -> bool:
        return self.optimizer in IN_BACKWARD

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "notes"}


def resolve_perf(cfg, device: torch.device, world_size: int = 1, adapters: bool = False) -> PerfOptions:
    """`cfg` (a `PerfConfig`) with every `auto` settled for `device`: on CUDA fused loss and experts, Liger, compiled
    layers (replayed as CUDA graphs beside an in-backward optimizer; `apply_optimizations` falls back to plain compiled
    layers where graphs cannot run), AdamW after the backward with the Triton kernel and every layer's update held
    back to the next forward, the gradient norm taken during the backward, prefetched batches; on CPU the fused loss
    only.

    `adapters`: only LoRA adapters train (many small tensors, a few MiB in all). Their update and norm cost the device
    next to nothing but cost the host one launch or hook per tensor, so auto keeps torch's multi-tensor AdamW inside
    the step and the norm after the backward (B4-lora on an H200, 576 adapter tensors: 7,070 tok/s that way, 5,466
    with the Triton kernel per tensor, every update held back and the norm per gradient in the backward)."""
    cuda = device.type == "cuda"

    def on(value: str, auto: bool) -> bool:
        return value == "on" or (value == "auto" and auto)

    optimizer = {"auto": "after-backward"}.get(cfg.optimizer, cfg.optimizer)
    # CUDA graphs only beside an in-backward optimizer (which a recipe asks for). Beside AdamW after the backward they
    # rule out the held-back updates and the in-backward norm, which pay more: with the flex-attention masks kept in
    # place (trainer.models.stable_block_masks) graphs ran 3-11% below compiled layers on an H200 (B1-bs4 60.7k vs
    # 62.8k, B1-bs1 36.4k vs 39.0k, B3 60.8k vs 68.3k tok/s), so auto compiles the layers without graphs there.
    graphs_pay = optimizer in IN_BACKWARD
    compile_mode = {"auto": ("layers-graphs" if graphs_pay else "layers") if cuda else "off"}.get(cfg.compile,
                                                                                                    cfg.compile)
    # where the held-back updates and the in-backward gradient norm pay: AdamW after the backward on CUDA, no graphs
    ungraphed_after_backward = cuda and optimizer == "after-backward" and compile_mode != "layers-graphs"
    large_tensors = not adapters  # per-tensor kernels and hooks pay for a model's weights, not for adapters
    return PerfOptions(
        fused_ce=on(cfg.fused_ce, True),
        fused_experts=on(cfg.fused_experts, cuda),
        kernels="liger" if cfg.kernels == "liger" or (cfg.kernels == "auto" and cuda) else "torch",
        compile=compile_mode,
        optimizer=optimizer,
        adamw={"auto": "triton" if cuda and large_tensors else "torch"}.get(cfg.adamw, cfg.adamw),
        defer=_resolve_defer(cfg.defer, ungraphed_after_backward and large_tensors),
        grad_norm=_resolve_grad_norm(cfg.grad_norm, ungraphed_after_backward and large_tensors and world_size == 1),
        graph_priority=cfg.graph_priority,
        step_priority=cfg.step_priority,
        prefetch=on(cfg.prefetch, cuda),
    )


def _resolve_defer(value: str, pays: bool) -> str:
    """auto: every layer's update under the next forward where AdamW runs after the backward on CUDA (B1-bs1
    1.64x -> 2.00x, B3 1.45x -> 1.57x, B1-bs4 1.97x -> 2.01x native, the same losses: docs/BENCHMARKS.md); not
    beside an in-backward optimizer (its update already runs in the backward) nor CUDA-graph layers (a held-back
    layer runs without its graph)."""
    if value != "auto":
        return value
    return "all" if pays else "none"


def _resolve_grad_norm(value: str, pays: bool) -> str:
    """auto: each gradient's norm during the backward, on a side stream, where one CUDA process runs AdamW after the
    backward without CUDA-graph layers (the pass after the backward was ~6.5 ms of B1-bs1's step on an H200)."""
    if value != "auto":
        return value
    return "in-backward" if pays else "after-backward"


# ---- model patches ---------------------------------------------------------------------------------------------

def apply_optimizations(model: torch.nn.Module, options: PerfOptions) -> list[str]:
    """Patch `model` in place for `options` (after parallelizing it); returns human-readable notes."""
    notes = options.notes
    aux_note = use_sync_free_aux_loss(model)
    if aux_note:
        notes.append(aux_note)
    if options.fused_experts:
        from trainer.moe.experts import set_fused_experts

        backend = "liger" if options.kernels == "liger" and _liger_importable() else "torch"
        count = set_fused_experts(model, True, activation_backend=backend)
        notes.append(f"fused experts on {count} MoE layers (activation: {backend})")
    if options.kernels == "liger":
        if options.compile != "off":
            # Inductor fuses RMSNorm itself, and compiled layers around Liger's RMSNorm failed at the first step on
            # an H200 (AssertionError, torch 2.11 + Liger 0.8.5): compiled runs keep the module for Inductor.
            notes.append("RMSNorm left to torch.compile (Liger RMSNorm is not used inside compiled layers)")
        elif _liger_importable():
            notes.append(f"liger RMSNorm on {_patch_liger_rmsnorm(model)} modules")
        else:
            notes.append("liger not importable: eager RMSNorm / SwiGLU")
    if options.compile == "layers-graphs":
        missing = _cuda_graphs_missing(model)
        if missing:
            options.compile = "layers"
            notes.append(f"CUDA graphs need {missing}: compile=layers")
    if options.compile == "layers-graphs" and keep_block_masks_in_place(model):
        notes.append("flex-attention masks kept at the same addresses every step (the layers' CUDA graphs read them)")
    if options.compile != "off":
        notes.append(_apply_compile(model, options.compile,
                                    ungraphed_last=deferred_layer_count(options, len(decoder_layers(model)))))
    for note in (_set_graph_priority(model, options), _resolve_step_priority(model, options)):
        if note:
            notes.append(note)
    return notes


def _resolve_step_priority(model: torch.nn.Module, options: PerfOptions) -> str | None:
    """Settle `options.step_priority` to "high" or "default" for this model (the step reads it); returns a note."""
    wanted, options.step_priority = options.step_priority, "default"
    if wanted == "default" or (wanted == "auto" and options.optimizer != "overlap"):
        return None  # nothing runs beside the step for it to go before
    if wanted == "auto" and replica_gradients(model) is not None:
        return "step at default priority: the replicas' gradient collectives run in the backward"
    if next(model.parameters()).device.type != "cuda":
        return None if wanted == "auto" else "step_priority=high needs CUDA: default priority"
    options.step_priority = "high"
    return "training step on a high-priority stream"


def _set_graph_priority(model: torch.nn.Module, options: PerfOptions) -> str | None:
    """Capture the layers' CUDA graphs at high priority where `options.graph_priority` asks for it; returns a note.
    `auto` asks only beside the overlapped optimizer (nothing else runs beside the graphs)."""
    wanted, options.graph_priority = options.graph_priority, "default"
    if wanted == "default" or (wanted == "auto" and options.optimizer != "overlap"):
        return None
    if options.compile != "layers-graphs":
        return None if wanted == "auto" else "graph_priority=high needs compile=layers-graphs: default priority"
    if wanted == "auto" and replica_gradients(model) is not None:
        return "CUDA graphs at default priority: the replicas' gradient collectives run in the backward"
    options.graph_priority = "high"
    return capture_graphs_at_high_priority(next(model.parameters()).device)


def _cuda_graphs_missing(model: torch.nn.Module) -> str | None:
    """What the model's step lacks for CUDA graphs, or None."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        return "one CUDA device in one process"
    if distributed and replica_gradients(model) is None:  # sharded layouts run collectives inside the layers
        return "one CUDA device in one process (or a replicated model)"
    dispatchers = {getattr(m, "moe_dispatcher", None) for m in model.modules()} - {None}
    if any(not getattr(d, "static_shapes", False) for d in dispatchers):
        return "no expert-parallel dispatch sized on the host (parallel.dispatcher=allgather has static shapes)"
    if has_fp32_expert_weights(model):
        return "bf16/fp16 expert weights (fp32 experts read row counts on the host)"
    return None


def has_fp32_expert_weights(model: torch.nn.Module) -> bool:
    """Whether a stacked [E, ...] expert weight is fp32: the grouped GEMM runs in bf16/fp16, fp32 experts loop on the
    host over the experts' row counts. LoRA adapters (fp32 trainable weights) do not count: their factors enter the
    grouped GEMMs in the rows' dtype (`trainer.lora.experts`)."""
    return any(param.dtype == torch.float32
               for module in experts_modules(model) for _, param in stacked_expert_params(module))


def _liger_importable() -> bool:
    from trainer.backends import liger_available

    return torch.cuda.is_available() and liger_available()[0]


def _is_plain_rmsnorm(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return (name.endswith("RMSNorm") and "Gated" not in name and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.ndim == 1 and hasattr(module, "variance_epsilon"))


def _patch_liger_rmsnorm(model: torch.nn.Module) -> int:
    """HF RMSNorm (fp32 statistics, `weight * x_normed.to(dtype)`) == Liger's "llama" casting mode."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    def forward(self, hidden_states):
        return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)

    count = 0
    for module in model.modules():
        if _is_plain_rmsnorm(module):
            module.forward = forward.__get__(module)
            count += 1
    return count


def deferred_layer_count(options: PerfOptions, num_layers: int) -> int:
    """How many last decoder layers (of `num_layers`) `options.defer` holds back to the next forward."""
    if options.defer == "all":
        return num_layers
    return int(options.defer) if options.defer.isdigit() else 0


def _apply_compile(model: torch.nn.Module, mode: str, ungraphed_last: int = 0) -> str:
    """torch.compile per decoder layer, the experts inside the layer's graph where they run `moe_fast` (the fused
    expert MLP is one custom op; other experts implementations stay eager: data-dependent loops). With
    "layers-graphs" each layer is replayed as CUDA graphs, except the last `ungraphed_last` layers (their gradients
    must outlive the step: `PerfOptions.defer`)."""
    targets = decoder_layers(model)
    for module in model.modules():
        if hasattr(module, "num_experts") and hasattr(module, "down_proj") and module.down_proj.ndim == 3:
            implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
            if implementation != EXPERTS_IMPLEMENTATION:
                module.forward = torch.compiler.disable(module.forward)
    compile_friendly_output_capture()
    graphed = targets[:max(0, len(targets) - ungraphed_last)] if mode == "layers-graphs" else []
    for module in targets:
        module.compile(dynamic=False, **({"mode": "reduce-overhead"} if module in graphed else {}))
    _allow_one_graph_per_layer(len(targets))
    model._moe_compiled = targets  # noqa: SLF001 - read by disable_compile
    model._moe_graphed = {id(m) for m in graphed}  # noqa: SLF001 - read by the optimizer (held-back gradients)
    note = f"torch.compile ({mode}) on {len(targets)} decoder layers"
    if mode == "layers-graphs" and ungraphed_last:
        note += f" (the last {ungraphed_last} without CUDA graphs: their updates are deferred)"
    return note


def _allow_one_graph_per_layer(num_modules: int) -> None:
    """Raise dynamo's per-function recompile limit (default 8) to cover every compiled layer.

    The layers share one forward function, and each layer specialises it once: transformers' output capture appends
    each layer's router logits to one list, and dynamo guards on that list's length (layer i sees i entries). Past
    the limit dynamo would run the remaining layers eagerly; the layers' graphs are identical, so the compiled code
    is reused from Inductor's cache and only the tracing repeats.
    """
    import torch._dynamo.config as dynamo_config

    needed = 2 * num_modules + 8  # per layer, plus the first-layer / block-type variants
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < needed:
            setattr(dynamo_config, name, needed)


def uses_cuda_graphs(model: torch.nn.Module) -> bool:
    """Whether some decoder layers of `model` replay as CUDA graphs (each step must then mark its start)."""
    return bool(getattr(model, "_moe_graphed", None))


def disable_compile(model: torch.nn.Module) -> bool:
    """Undo `compile` (eager again); True if anything was compiled. Used when the first compiled step fails."""
    targets = getattr(model, "_moe_compiled", None)
    if not targets:
        return False
    for module in targets:
        module._compiled_call_impl = None  # what nn.Module.compile sets
    model._moe_compiled = []
    model._moe_graphed = set()
    return True
