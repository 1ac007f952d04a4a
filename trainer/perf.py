"""Speed and memory options of a training step, each independent and each with a fallback.

    options = PerfOptions.parse("fused-ce+fused-experts+liger+ac=attn+opt=in-backward")
    notes = apply_optimizations(model, options)          # patches modules in place; returns what it did / skipped
    loss = causal_lm_loss(model, input_ids, labels, options).loss
    optimizer = build_optimizer(model, options, lr=1e-4) # trainer.step_optimizer: .step() / .zero_grad()

Options (the benchmark keeps each only where it pays, docs/BENCHMARKS.md):
- loss: "hf" (the model's own forward + loss), "fused" (linear + cross-entropy without full logits: the chunked
  kernel, compiled per chunk on CUDA), "chunked" (the same), "liger" (Liger's Triton kernel). The router aux loss is
  HF's own.
- fused_experts: the memory-lean expert MLP (local experts path, `trainer.kernels.fused_expert_mlp`).
- kernels: "eager" or "liger" (Liger Triton RMSNorm patched into every HF RMSNorm, Liger SwiGLU inside the experts);
  falls back to eager with a note when liger is not importable.
- compile: "none", "layers" (torch.compile each decoder layer, experts kept eager), "layers-all" (experts too: the
  fused expert MLP enters the graph as one custom op), "layers-graphs" (as "layers-all", each layer's graphs then
  replayed as CUDA graphs: one launch per graph instead of one per kernel, for steps that wait on the host; one CUDA
  device, one process, bf16/fp16 weights, else "layers" with a note; the overlapped optimizer then holds the
  gradients to the step's end), "attn" (only the attention modules and norms). `disable_compile(model)` undoes it
  (first-step fallback).
- ac: activation checkpointing "none", "full" (every decoder layer), "attn" (= "selective": only the attention
  sub-block is recomputed: cheap to recompute per byte saved and it holds no router state), "mlp" (the MoE sub-block).
- optimizer: "foreach" (torch AdamW default), "fused" (one kernel), "in-backward" (fused AdamW per parameter as soon as
  its gradient is complete, so the full set of gradients never exists; no clipping, no accumulation), "overlap"
  (in-backward, with the updates on a side CUDA stream so the memory-bound AdamW runs under the compute-bound
  backward; `.step()` joins the streams).
- adamw: the in-backward / fp32-master optimizer's kernel: "torch" (`torch._fused_adamw_`) or "triton" (the same
  update, one Triton kernel per tensor at close to full memory bandwidth: `trainer.kernels.adamw`);
  adamw_launch: that kernel's launch shape, "default" or "<elements per program>x<warps>" (`LAUNCH_SHAPES`).
- defer: with an in-backward optimizer, which updates wait for the next forward instead of queueing in the backward:
  "none", "head" (the output head: its gradient comes first in the backward, its weight is read last in the
  forward), or "1".."4" (the head and that many last decoder layers, which then run compiled without CUDA graphs:
  a graph's memory pool would hand their held gradients to the next step's replays). The next forward launches them
  when it starts and waits for each just before its module runs (`trainer.step_optimizer`).
- graph_priority: "default", "high" (with "layers-graphs": the layers' CUDA graphs captured on a stream of the
  highest priority, so their kernels go before the overlapped optimizer's blocks: `trainer.graph_priority`) or
  "auto" (high in one process; default where gradient collectives run in the backward, whose kernels then wait
  behind the graphs: B1 +1.6-2%, B2 replicas -3%).
- step_priority: "default", "high" (the training step runs on a CUDA stream of the highest priority,
  `trainer.step_optimizer.step_stream`: the kernels outside the CUDA graphs, e.g. the Mamba mixers' and the loss's,
  then also go before the overlapped optimizer's blocks instead of taking turns with them) or "auto" (high with the
  overlapped optimizer in one process; default where gradient collectives run in the backward, as graph_priority).
- rope: "default" or "static" (the rotary embedding's cos and sin written into buffers with a fixed address, marked
  static, so CUDA-graph layers read them in place instead of copying them in before every replay:
  `trainer.models.static_rotary`).
- master: "none" (optimizer works on the parameters' dtype) or "fp32" (fp32 master weights and AdamW states kept by
  the optimizer, bf16 parameters for compute: the recommended recipe).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from trainer.graph_priority import capture_graphs_at_high_priority
from trainer.kernels.adamw import LAUNCH_SHAPES as ADAMW_LAUNCH_SHAPES
from trainer.kernels.linear_cross_entropy import IGNORE_INDEX, linear_cross_entropy_sum, shift_labels
from trainer.parallel.replicate import replica_gradients
from trainer.models.aux_loss import use_sync_free_aux_loss
from trainer.models.output_capture import compile_friendly_output_capture
from trainer.moe.experts import IMPLEMENTATION_NAME as EXPERTS_IMPLEMENTATION

CHOICES = {
    "loss": ("hf", "fused", "chunked", "liger"),
    "kernels": ("eager", "liger"),
    "compile": ("none", "layers", "layers-all", "layers-graphs", "attn"),
    "ac": ("none", "full", "attn", "selective", "mlp"),
    "optimizer": ("foreach", "fused", "in-backward", "overlap"),
    "adamw": ("torch", "triton"),
    "adamw_launch": ADAMW_LAUNCH_SHAPES,
    "master": ("none", "fp32"),
    "defer": ("none", "head", "1", "2", "3", "4"),
    "graph_priority": ("default", "high", "auto"),
    "step_priority": ("default", "high", "auto"),
    "rope": ("default", "static"),
}

BOOLEAN_OPTIONS = ("fused_experts", "fp8")

# Short names for the benchmark's --variants: "base+fused-ce+ac=attn" applies each token in order.
SHORTCUTS = {
    "base": {},
    "fused-ce": {"loss": "fused"},
    "fused-experts": {"fused_experts": True},
    "liger": {"kernels": "liger"},
    "compile": {"compile": "layers"},
    "compile-all": {"compile": "layers-all"},
    "cuda-graphs": {"compile": "layers-graphs"},
    "compile-attn": {"compile": "attn"},
    "fused-adamw": {"optimizer": "fused"},
    "opt-in-bwd": {"optimizer": "in-backward"},
    "opt-overlap": {"optimizer": "overlap"},
    "triton-adamw": {"adamw": "triton"},
    "defer-head": {"defer": "head"},
    "graphs-first": {"graph_priority": "high"},
    "step-first": {"step_priority": "high"},
    "static-rope": {"rope": "static"},
    "master-fp32": {"master": "fp32"},
    "fp8": {"fp8": True},
    "best": {"loss": "fused", "fused_experts": True, "kernels": "liger", "optimizer": "overlap",
             "compile": "layers-graphs", "adamw": "triton", "graph_priority": "auto"},
}


@dataclass
class PerfOptions:
    loss: str = "hf"
    fused_experts: bool = False
    kernels: str = "eager"
    compile: str = "none"
    ac: str = "none"
    optimizer: str = "foreach"
    adamw: str = "torch"  # the per-parameter AdamW's kernel (optimizer in-backward/overlap, master fp32)
    adamw_launch: str = "default"  # the Triton AdamW kernel's launch shape
    defer: str = "none"  # updates run under the next forward: "head" or the head + the last N decoder layers
    graph_priority: str = "default"  # "high"/"auto": the layers' CUDA graphs captured on a high-priority stream
    step_priority: str = "default"  # "high"/"auto": the training step on a high-priority stream
    rope: str = "default"  # "static": the rotary (cos, sin) in fixed-address buffers, read in place by the graphs
    master: str = "none"
    fp8: bool = False
    notes: list[str] = field(default_factory=list, compare=False)

    @classmethod
    def parse(cls, spec: str) -> "PerfOptions":
        """"base", "best", "fused-ce+fused-experts", "loss=chunked+ac=full", ... (tokens applied left to right)."""
        options = cls()
        for token in [t for t in spec.replace(",", "+").split("+") if t]:
            if token in SHORTCUTS:
                for key, value in SHORTCUTS[token].items():
                    setattr(options, key, value)
                continue
            key, sep, value = token.partition("=")
            key = {"opt": "optimizer"}.get(key, key).replace("-", "_")
            if not sep or key not in {f.name for f in dataclasses.fields(cls)} or key == "notes":
                raise ValueError(f"unknown option {token!r}: use one of {sorted(SHORTCUTS)} or key=value "
                                 f"with keys {sorted(CHOICES) + list(BOOLEAN_OPTIONS)}")
            if key in BOOLEAN_OPTIONS:
                setattr(options, key, value.lower() in ("1", "true", "on", "yes"))
                continue
            if value not in CHOICES[key]:
                raise ValueError(f"option {key}={value!r}: choose one of {CHOICES[key]}")
            setattr(options, key, value)
        return options

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "notes"}


# ---- model patches ---------------------------------------------------------------------------------------------

def apply_optimizations(model: torch.nn.Module, options: PerfOptions) -> list[str]:
    """Patch `model` in place for `options`; returns human-readable notes (what ran, what fell back and why)."""
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
        if options.compile != "none":
            # Inductor fuses RMSNorm itself, and compiled layers around Liger's RMSNorm failed at the first step on
            # an H200 (AssertionError, torch 2.11 + Liger 0.8.5): compiled runs keep the module for Inductor.
            notes.append("RMSNorm left to torch.compile (Liger RMSNorm is not used inside compiled layers)")
        elif _liger_importable():
            notes.append(f"liger RMSNorm on {_patch_liger_rmsnorm(model)} modules")
        else:
            notes.append("liger not importable: eager RMSNorm / SwiGLU")
    if options.rope == "static":
        from trainer.models.static_rotary import use_static_rotary

        notes.append(f"rotary embeddings in fixed-address buffers ({use_static_rotary(model)} modules)")
    if options.fp8:
        notes.append(_apply_fp8(model))
    if options.ac != "none":
        notes.append(_apply_checkpointing(model, options.ac))
    if options.compile == "layers-graphs":
        missing = _cuda_graphs_missing(model)
        if missing:
            options.compile = "layers"
            notes.append(f"CUDA graphs need {missing}: compile=layers")
    if options.compile != "none":
        notes.append(_apply_compile(model, options.compile, ungraphed_last=deferred_layer_count(options)))
    priority_note = _set_graph_priority(model, options)
    if priority_note:
        notes.append(priority_note)
    step_note = _resolve_step_priority(model, options)
    if step_note:
        notes.append(step_note)
    return notes


def _resolve_step_priority(model: torch.nn.Module, options: PerfOptions) -> str | None:
    """Settle `options.step_priority` to "high" or "default" for this model (the step loop reads it); returns a note."""
    if options.step_priority == "default":
        return None
    wanted, options.step_priority = options.step_priority, "default"
    if wanted == "auto" and options.optimizer != "overlap":
        return None  # nothing runs beside the step for it to go before
    if wanted == "auto" and replica_gradients(model) is not None:
        return "step at default priority: the replicas' gradient collectives run in the backward"
    if next(model.parameters()).device.type != "cuda":
        return None if wanted == "auto" else "step_priority=high needs CUDA: default priority"
    options.step_priority = "high"
    return "training step on a high-priority stream"


def _set_graph_priority(model: torch.nn.Module, options: PerfOptions) -> str | None:
    """Capture the layers' CUDA graphs at high priority where `options.graph_priority` asks for it; returns a note."""
    if options.graph_priority == "default":
        return None
    if options.compile != "layers-graphs":  # "auto" asks only where there are graphs
        return None if options.graph_priority == "auto" else \
            "graph_priority=high needs cuda-graphs (compile=layers-graphs): default priority"
    if options.graph_priority == "auto" and replica_gradients(model) is not None:
        return "CUDA graphs at default priority: the replicas' gradient collectives run in the backward"
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
    if any(p.dtype == torch.float32 for p in model.parameters()):
        # the grouped GEMM runs in bf16/fp16; fp32 experts loop on the host over the experts' row counts
        return "bf16/fp16 weights (fp32 experts read row counts on the host)"
    return None


def _liger_importable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import liger_kernel.ops.rms_norm  # noqa: F401
    except Exception:
        return False
    return True


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


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks (HF `_no_split_modules` classes) in model order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
        layers = list(getattr(base, "layers", []))
    return layers


def _sub_blocks(layer: torch.nn.Module, which: str) -> list[torch.nn.Module]:
    """The attention (or MoE/MLP) sub-modules of one decoder layer, for Llama-style and Nemotron-H-style blocks."""
    if which == "attn":
        found = [getattr(layer, n) for n in ("self_attn", "attention") if hasattr(layer, n)]
    else:
        found = [getattr(layer, n) for n in ("mlp", "block_sparse_moe", "feed_forward") if hasattr(layer, n)]
    mixer = getattr(layer, "mixer", None)
    if mixer is not None:
        kind = str(getattr(layer, "block_type", ""))
        is_attn = "attention" in kind
        if (which == "attn") == is_attn:
            found.append(mixer)
    return found


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return wrapper


def _apply_checkpointing(model: torch.nn.Module, mode: str) -> str:
    if mode == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return "activation checkpointing: every decoder layer"
    which = "attn" if mode in ("attn", "selective") else "mlp"
    count = 0
    for layer in decoder_layers(model):
        for sub in _sub_blocks(layer, which):
            sub.forward = _checkpointed(sub.forward)
            count += 1
    return f"activation checkpointing: {count} {which} sub-blocks"


def deferred_layer_count(options: PerfOptions) -> int:
    """How many last decoder layers' updates `options.defer` holds back to the next forward."""
    return int(options.defer) if options.defer.isdigit() else 0


def _apply_compile(model: torch.nn.Module, mode: str, ungraphed_last: int = 0) -> str:
    """torch.compile per decoder layer (or attention/norm module); with "layers-graphs" the last `ungraphed_last`
    layers are compiled without CUDA graphs (their gradients must outlive the step: `PerfOptions.defer`)."""
    if mode == "attn":
        targets = [sub for layer in decoder_layers(model) for sub in _sub_blocks(layer, "attn")]
        targets += [m for m in model.modules() if _is_plain_rmsnorm(m)]
    else:
        targets = decoder_layers(model)
        # "layers": the experts run eagerly between two graphs per layer. "layers-all": experts running `moe_fast`
        # choose per call what dynamo may trace (trainer.moe.experts: the fused expert MLP is one custom op, so the
        # layer is one graph); any other experts implementation stays out of the graph (data-dependent loops)
        for module in model.modules():
            if hasattr(module, "num_experts") and hasattr(module, "down_proj") and module.down_proj.ndim == 3:
                implementation = getattr(getattr(module, "config", None), "_experts_implementation", None)
                ours = implementation == EXPERTS_IMPLEMENTATION
                if mode == "layers" or not ours:
                    module.forward = torch.compiler.disable(module.forward)
    compile_friendly_output_capture()
    graphed = targets[:max(0, len(targets) - ungraphed_last)] if mode == "layers-graphs" else []
    for module in targets:
        module.compile(dynamic=False, **({"mode": "reduce-overhead"} if module in graphed else {}))
    _allow_one_graph_per_layer(len(targets))
    model._moe_compiled = targets  # noqa: SLF001 - read by disable_compile
    model._moe_graphed = {id(m) for m in graphed}  # noqa: SLF001 - read by the optimizer (held-back gradients)
    note = f"torch.compile ({mode}) on {len(targets)} modules"
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


def _apply_fp8(model: torch.nn.Module) -> str:
    try:
        from torchao.float8 import convert_to_float8_training
    except Exception as err:
        return f"fp8 skipped: torchao not importable ({type(err).__name__})"

    def only_attention_linears(module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and any(p in fqn for p in ("q_proj", "k_proj", "v_proj", "o_proj"))

    convert_to_float8_training(model, module_filter_fn=only_attention_linears)
    return "fp8 (torchao float8, tensorwise) on the attention projections"


# ---- the loss --------------------------------------------------------------------------------------------------

@dataclass
class StepLoss:
    loss: torch.Tensor  # what backward runs on: token-mean cross-entropy + coef * aux
    ce: torch.Tensor  # token-mean cross-entropy, detached
    aux: torch.Tensor | None


def _head_forward(self, hidden_states):
    """LM head patched for the fused loss: returns the summed cross-entropy [] while targets are set, else logits."""
    targets_N = self.__dict__.get("_moe_ce_targets")
    if targets_N is None:
        return torch.nn.functional.linear(hidden_states, self.weight, self.bias)
    backend = self.__dict__["_moe_ce_backend"]
    return linear_cross_entropy_sum(hidden_states.flatten(0, 1), self.weight, targets_N, IGNORE_INDEX, backend)


def _fused_head(model) -> torch.nn.Module | None:
    """The LM head, patched once to compute the fused loss inside the model's own forward, or None if unsafe."""
    head = model.get_output_embeddings()
    config = model.config
    scaled = any(getattr(config, name, None) not in (None, 1.0) for name in
                 ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"))
    if not isinstance(head, torch.nn.Linear) or head.bias is not None or scaled:
        return None
    if "_moe_ce_backend" not in head.__dict__:
        head.forward = _head_forward.__get__(head)
    return head


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, options: PerfOptions,
                   output_router_logits: bool = True) -> StepLoss:
    """Next-token loss of a HF causal LM on [B, S] ids/labels, computed as `options.loss` says.

    "hf": model(input_ids, labels=...) exactly. Otherwise the model's own forward runs without labels while its LM
    head returns the fused linear cross-entropy (never [B*S, V] logits); running inside the model's forward keeps
    FSDP2's hooks and HF's router aux loss (added with the config's coefficient, as HF does) exactly as they are.
    Heads with a bias or logit scaling/soft-capping fall back to "hf" (noted in options.notes).
    """
    if options.compile == "layers-graphs":
        # a new training step: the previous step's graph outputs (activations, gradients) may be overwritten now
        torch.compiler.cudagraph_mark_step_begin()
    want_router = output_router_logits and _accepts_router_logits(model)
    kwargs = {"output_router_logits": True} if want_router else {}
    head = None if options.loss == "hf" else _fused_head(model)
    if head is None:
        if options.loss != "hf" and "fused loss unsupported for this head: hf loss" not in options.notes:
            options.notes.append("fused loss unsupported for this head: hf loss")
        out = model(input_ids=input_ids, labels=labels, use_cache=False, **kwargs)
        aux = getattr(out, "aux_loss", None)
        ce = out.loss.detach() - (_aux_coef(model) * aux.detach() if aux is not None else 0.0)
        return StepLoss(out.loss, ce, aux)
    targets_N = shift_labels(labels).flatten()
    head.__dict__["_moe_ce_backend"] = {"fused": "auto", "chunked": "chunked", "liger": "liger"}[options.loss]
    head.__dict__["_moe_ce_targets"] = targets_N
    try:
        out = model(input_ids=input_ids, use_cache=False, logits_to_keep=0, **kwargs)
    finally:
        head.__dict__["_moe_ce_targets"] = None
    ce = out.logits.float().reshape(()) / (targets_N != IGNORE_INDEX).sum().clamp_min(1)
    loss, aux = ce, getattr(out, "aux_loss", None)
    if aux is not None:
        loss = ce + _aux_coef(model) * aux.to(ce.device)
    return StepLoss(loss, ce.detach(), aux)


def _aux_coef(model) -> float:
    return float(getattr(model, "router_aux_loss_coef", None) or getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)


def _accepts_router_logits(model) -> bool:
    return hasattr(model.config, "output_router_logits")
