"""Per-rank peak memory of one training step: the formula, component by component (docs/PLANNER.md).

The peak is the largest of three moments of a steady-state step (step >= 2, optimizer states exist):
1. `loss`: the start of the backward - every layer's saved activations plus the cross-entropy buffers
   (HF's loss: 12 bytes x vocab per token: fp32 log-softmax output, its gradient and the logits' gradient; plus the
   logits themselves when the loop keeps the outputs. The chunked loss: one chunk's logits, fp32 work buffer and
   logit gradient, the hidden states' gradient and, when the head trains, its gradient);
2. `layer`: the backward of layer l - saved activations of layers <= l, gradients of layers > l, the block's
   backward workspace, the recomputed activations when checkpointing, the FSDP2 unit buffers;
3. `step`: the optimizer step - params + all grads + AdamW states + the foreach temporary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.kernels.ce_chunks import chunk_rows
from trainer.planner.activations import ActivationContext, block_bytes, norm_bytes
from trainer.planner.hardware import GiB
from trainer.planner.layout import Layout, PlanOptions
from trainer.planner.model_shape import ModelShape
from trainer.planner.precision import optimizer_temp_bytes, precision

COMPONENTS = ("params", "grads", "optimizer", "activations", "loss", "comm", "workspace")


@dataclass
class MemoryEstimate:
    """Per-rank bytes by component at the peak moment, plus each moment's total."""

    components: dict[str, float]
    phase: str  # which moment is the peak: loss | layer | step
    phases: dict[str, float] = field(default_factory=dict)
    activations_by_kind: dict[str, float] = field(default_factory=dict)  # saved bytes per block type (no ckpt)

    @property
    def total(self) -> float:
        return sum(self.components.values())

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    def gib(self, name: str) -> float:
        return self.components.get(name, 0.0) / GiB


def uses_fsdp(layout: Layout, options: PlanOptions) -> bool:
    if options.fsdp is not None:
        return options.fsdp
    return layout.dp_shard > 1 or precision(options.precision).mixed


def rank_params(shape: ModelShape, layout: Layout) -> tuple[list[float], float]:
    """Parameters resident on one rank: per decoder layer, and the root (embeddings, final norm, lm_head).

    Non-expert weights are split over dp_shard ranks; experts over ep x expert_fsdp = dp_shard ranks too, so the
    resident count does not depend on ep (ep changes what is gathered and what is sent, see `unit_params`)."""
    per_layer = [sum(shape.layer_params(layer)) / layout.dp_shard for layer in shape.layers]
    return per_layer, shape.root_params / layout.dp_shard


def unit_params(shape: ModelShape, layout: Layout) -> float:
    """Largest FSDP2 unit (one decoder layer) as gathered on a rank: non-expert weights whole, experts / ep."""
    return max(ex / layout.ep_size + ne for ex, ne in (shape.layer_params(layer) for layer in shape.layers))


def estimate_memory(shape: ModelShape, layout: Layout, options: PlanOptions | None = None) -> MemoryEstimate:
    """Peak bytes per rank for one training step of `shape` under `layout` (see the module docstring)."""
    options = options or PlanOptions()
    prec = precision(options.precision)
    c = prec.compute_bytes
    tokens = layout.tokens
    fsdp = uses_fsdp(layout, options)
    # the all-gather dispatcher sizes its row buffers for every (token, expert) pair of the EP group
    capacity = float(layout.ep_size) if layout.dispatcher == "allgather" else options.capacity_factor
    # the fused expert MLP runs in one process or beside the all-gather dispatcher (trainer.moe.experts)
    fused_experts = options.fused_experts and (layout.ep_size == 1 or layout.dispatcher == "allgather")
    ctx = ActivationContext(shape.hidden, c, capacity, layout.ep_size, fused_experts)

    layer_params, root_params = rank_params(shape, layout)
    n_params = sum(layer_params) + root_params
    params = prec.param_bytes * n_params
    optimizer = prec.state_bytes * n_params
    grads_all = prec.grad_bytes * n_params
    step_temp = optimizer_temp_bytes(prec, options.optimizer_fused) * n_params
    lora = options.adapter_params is not None
    if lora:  # frozen base (weights only) + fp32 adapters with fp32 gradients and AdamW moments
        adapters = options.adapter_params / layout.dp_shard
        params += 4 * adapters
        optimizer, grads_all = 8 * adapters, 4 * adapters
        step_temp = (0 if options.optimizer_fused else 4) * adapters

    # Activations per layer: saved (kept to the backward), recomputed (rebuilt during that layer's backward).
    saved, recompute, workspace = [], [], []
    by_kind: dict[str, float] = {}
    for layer in shape.layers:
        parts = [block_bytes(b, ctx) for b in layer]
        full = sum(p.saved for p in parts)
        for p in parts:
            by_kind[p.kind] = by_kind.get(p.kind, 0.0) + p.saved * tokens
        if layout.checkpointing == "full":
            saved.append(c * shape.hidden * tokens)  # the layer input
            recompute.append(full * tokens)
        elif layout.checkpointing == "moe":
            saved.append((full - sum(p.experts for p in parts)) * tokens)
            recompute.append(max((p.experts for p in parts), default=0.0) * tokens)
        elif layout.checkpointing == "attention":
            attention = [p.saved for p in parts if p.kind == "attention"]
            saved.append((full - sum(attention)) * tokens)
            recompute.append(max(attention, default=0.0) * tokens)
        else:
            saved.append(full * tokens)
            recompute.append(0.0)
        workspace.append(max(p.workspace for p in parts) * tokens)

    final_norm = norm_bytes(shape.hidden, c) * tokens
    logits_bytes = (4 if shape.logits_fp32 else c) * shape.vocab_size * tokens
    held_logits = logits_bytes if options.keep_outputs and not options.fused_ce else 0.0
    ce_buffers = (_chunked_loss_bytes(shape, tokens, c, head_trains=not lora) if options.fused_ce
                  else 12 * shape.vocab_size * tokens)

    # Communication buffers: FSDP2 all-gathers a unit (current + prefetched) in the compute dtype, reduce-scatters
    # its gradient (unsharded grad in the compute dtype + the reduce-dtype copy), and keeps the root unsharded
    # from forward to backward. DeepEP holds one NVLink buffer for the whole run.
    persistent_comm = options.deepep_buffer_gib * GiB if layout.dispatcher == "deepep" and layout.ep_size > 1 else 0.0
    fsdp_gather = fsdp_reduce = fsdp_root = 0.0
    kept = [0.0] * len(shape.layers)  # per layer: gathered weights held from its forward to its backward (zero2)
    if fsdp:
        unit = unit_params(shape, layout)
        fsdp_gather = 2 * unit * c
        fsdp_reduce = unit * (c + prec.reduce_bytes)
        fsdp_root = shape.root_params * c
        if not layout.reshard_after_forward and layout.dp_shard > 1:
            kept = [c * (ex / layout.ep_size + ne) for ex, ne in map(shape.layer_params, shape.layers)]
    grads_during = grads_all if options.grad_accum_steps > 1 else 0.0  # earlier micro-batches' gradients

    phases: dict[str, dict[str, float]] = {}
    phases["loss"] = {
        "params": params, "grads": grads_during, "optimizer": optimizer,
        "activations": sum(saved) + final_norm, "loss": ce_buffers + held_logits,
        "comm": persistent_comm + max(fsdp_gather, sum(kept)) + fsdp_root, "workspace": 0.0,
    }
    best_layer: dict[str, float] | None = None
    grads_above = grads_all if lora else prec.grad_bytes * root_params  # adapters: all of them, an upper bound
    for i in reversed(range(len(shape.layers))):
        candidate = {
            "params": params, "grads": max(grads_during, grads_above), "optimizer": optimizer,
            "activations": sum(saved[: i + 1]) + recompute[i], "loss": held_logits,
            "comm": persistent_comm + max(fsdp_gather, sum(kept[: i + 1])) + fsdp_reduce + fsdp_root,
            "workspace": workspace[i],
        }
        if best_layer is None or sum(candidate.values()) > sum(best_layer.values()):
            best_layer = candidate
        grads_above += 0.0 if lora else prec.grad_bytes * layer_params[i]
    if best_layer is not None:
        phases["layer"] = best_layer
    phases["step"] = {
        "params": params, "grads": grads_all, "optimizer": optimizer, "activations": 0.0,
        "loss": held_logits, "comm": persistent_comm, "workspace": step_temp,
    }
    peak = max(phases, key=lambda name: sum(phases[name].values()))
    return MemoryEstimate(
        components=dict(phases[peak]), phase=peak,
        phases={name: sum(v.values()) for name, v in phases.items()}, activations_by_kind=by_kind,
    )


def _chunked_loss_bytes(shape: ModelShape, tokens: int, c: int, head_trains: bool) -> float:
    """Live bytes of the chunked linear cross-entropy (`trainer.kernels.linear_cross_entropy`) at its peak: one
    chunk's logits (c), fp32 work buffer (4) and logit gradient (c) per row and vocab entry, the hidden states'
    gradient [T, H] and, when the head trains, its gradient [V, H], both written during the forward."""
    rows = chunk_rows(tokens, shape.vocab_size)
    head_grad = c * shape.vocab_size * shape.hidden if head_trains else 0.0
    return (2 * c + 4) * rows * shape.vocab_size + c * tokens * shape.hidden + head_grad
