"""AdamW and the learning-rate schedule (linear warmup, then cosine decay to `lr * min_lr_ratio`).

    optimizer = build_optimizer(model, recipe.optim, options)   # options: trainer.perf.PerfOptions
    scheduler = build_scheduler(optimizer, recipe.optim, max_steps)

One optimizer for every mode (`perf.optimizer`): `AdamW` is a `torch.optim.Optimizer` (param groups, state dict,
DCP checkpoints, LR schedulers all work as with torch's) whose update is torch's fused AdamW kernel
(`torch._fused_adamw_`) or the same update as one Triton kernel per tensor (`perf.adamw=triton`,
`trainer.kernels.adamw`), applied per decoder layer ("bucket"):
- after-backward: `step()` walks the buckets once the backward is done; `step(found_inf=flag)` skips the update on
  the device when the flag is set (a non-finite step), without the host reading anything;
- in-backward: each bucket is updated as soon as its last gradient is complete (post-accumulate-grad hooks) and its
  gradients freed, so the full set of gradients never exists (no clipping, no accumulation, no skipping);
- overlap: in-backward, the updates on a side CUDA stream so the memory-bound AdamW runs under the compute-bound
  backward; `step()` joins the streams.
In any mode `perf.defer` holds the updates of the output head (and of the last or all decoder layers) back to the
next forward, which applies each just before its module runs, on a side CUDA stream: AdamW under the forward.
No weight decay on 1-D tensors (norms, biases, router biases).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from trainer.config import OptimConfig
from trainer.kernels import adamw as adamw_kernel
from trainer.parallel.checkpointing import decoder_layers
from trainer.parallel.replicate import replica_gradients


class AdamW(torch.optim.Optimizer):
    """AdamW with per-layer buckets, a device-side skip, and optional in-backward / overlapped updates.

    All parameters step together, so they share one fp32 step counter per device (the state's "step" entries are
    that tensor), advanced by `step()` once every parameter has been updated (by 0 on a skipped step). Sharded
    (DTensor) parameters keep DTensor states and are updated one by one through their local shards, in the stream
    where FSDP2 calls the hook.

    `in_backward` / `overlap`: autograd fires the hook only after the parameter's last use in the backward, so its
    gradient is complete; with `overlap` its memory is kept until the side stream is done with it (`record_stream`,
    or a reference held until `step()` with `hold_gradients`, needed when gradients live in a CUDA-graph memory pool,
    which reuses memory that no tensor references within the same step and knows nothing of the side stream), and
    `step()` makes the compute stream wait for every update before the next forward reads the parameters.

    `replicas`: a replicated model's gradient sharing (`trainer.parallel.replicate.ReplicaGradients`): each bucket's
    gradients are averaged across the replicas right before their update, in the same stream.

    `defer=(start_module, [(use_module, params), ...])` holds the updates of those parameters back from the step
    (the output head and the last decoder layers, or all of them). `step()` queues them with what the update needs
    as it was at that step: their gradients, a copy of the step counter, the param groups' hyperparameters (the
    LR scheduler moves on before they run) and, after the backward, the step's skip flag and clipping divisor. The
    next forward launches them when `start_module` runs (on a side stream on CUDA) and waits for each group's update
    just before its `use_module` runs. `flush()` applies queued updates at once (before reading the parameters
    elsewhere, e.g. to save them).
    """

    def __init__(self, groups: list[dict], lr: float, betas, eps: float, in_backward: bool = False,
                 overlap: bool = False, buckets: list[list[torch.nn.Parameter]] | None = None,
                 hold_gradients: bool = False, triton_kernel: bool = False, replicas=None, defer=None):
        super().__init__(groups, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0))
        self.in_backward, self.hold_gradients, self.triton_kernel = in_backward, hold_gradients, triton_kernel
        self._replicas = replicas
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._views = {}  # parameter -> (weight, exp_avg, exp_avg_sq): the tensors the kernels update here
        self._state_tensors = {}  # parameter -> (exp_avg, exp_avg_sq) as the state holds them (DTensors if p is)
        self._steps = {}  # device -> shared step counter (fp32 scalar, as the fused kernel reads it)
        self._side_stream = None
        self._held: list[torch.Tensor] = []
        self._defer_group = {p: g for g, (_, group) in enumerate(defer[1]) for p in group} if defer else {}
        self._held_back: dict[int, list[tuple[list, list]]] = {}
        self._queued = None  # (held-back work, step counter copies, hyperparameters) for the next forward
        self._queued_done: dict[int, object] = {}  # group -> CUDA event on the side stream: its update is done
        if defer:
            start_module, deferred = defer
            start_module.register_forward_pre_hook(torch.compiler.disable(self._run_queued))
            for g, (use_module, _) in enumerate(deferred):
                use_module.register_forward_pre_hook(torch.compiler.disable(functools.partial(self._wait_queued, g)))
        params = [p for g in self.param_groups for p in g["params"]]
        # a side stream for the overlapped in-backward updates, or for updates held back to run under the forward
        side_stream = (overlap and in_backward) or (bool(defer) and not in_backward)
        for p in params:
            self._add_state(p)
            if in_backward:
                p.register_post_accumulate_grad_hook(self._on_gradient)
            if side_stream and _local(p).is_cuda and self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device=_local(p).device)
        self._buckets = _complete_buckets(params, buckets)
        self._bucket_of = {p: i for i, bucket in enumerate(self._buckets) for p in bucket}
        self._ready: list[list[torch.Tensor]] = [[] for _ in self._buckets]

    def _add_state(self, p: torch.Tensor) -> None:
        if self._replicas is not None:  # a sharded replica optimizer keeps state for this rank's slice only
            weight = self._replicas.view_of(p)
            local_m, local_v = torch.zeros_like(weight), torch.zeros_like(weight)
            exp_avg, exp_avg_sq = self._replicas.state_tensor(p, local_m), self._replicas.state_tensor(p, local_v)
        else:
            weight = _local(p).detach()
            exp_avg, exp_avg_sq = torch.zeros_like(p.detach()), torch.zeros_like(p.detach())  # DTensors if p is
            local_m, local_v = _local(exp_avg), _local(exp_avg_sq)
        if weight.device not in self._steps:
            self._steps[weight.device] = torch.ones((), dtype=torch.float32, device=weight.device)
        self._views[p] = (weight, local_m, local_v)
        self._state_tensors[p] = (exp_avg, exp_avg_sq)
        self.state[p] = {"step": self._steps[weight.device], "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    # ---- in-backward ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _on_gradient(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if _is_sharded(p):
            # FSDP2 calls this hook on its reduce-scatter stream, after the gradient's reduce-scatter: the update
            # already runs beside the backward, in the stream that owns the gradient's memory
            self._update([p])
            return
        index = self._bucket_of[p]
        ready = self._ready[index]
        ready.append(p)
        if len(ready) == len(self._buckets[index]):
            self._complete(ready)
            self._ready[index] = []

    def _complete(self, params: list[torch.Tensor]) -> None:
        """A bucket's gradients are complete: update it now, or hold it back for the next forward."""
        group = self._defer_group.get(params[0])
        if group is None:
            self._launch(params)
            return
        self._hold_back(group, params)

    def _hold_back(self, group: int, params: list[torch.Tensor], found_inf: torch.Tensor | None = None,
                   grad_scale: torch.Tensor | None = None) -> None:
        self._held_back.setdefault(group, []).append((params, [p.grad for p in params], found_inf, grad_scale))
        for p in params:
            p.grad = None

    def _launch(self, params: list[torch.Tensor]) -> None:
        side = self._side_stream
        if side is None:
            self._update(params)
            return
        side.wait_stream(torch.cuda.current_stream(side.device))
        if not self.hold_gradients:
            for p in params:
                p.grad.record_stream(side)  # its memory must outlive the update, not just this hook
        with torch.cuda.stream(side):
            self._update(params)

    # ---- the update -----------------------------------------------------------------------------------------

    def _update(self, params: list[torch.Tensor], grads: list[torch.Tensor] | None = None, steps=None,
                found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None,
                hypers: dict[int, dict] | None = None) -> None:
        """Update `params` from `grads` (default: their .grad) with the step counters `steps` (default: the live
        ones) and the hyperparameters `hypers` ({id(param group): values}; default: the groups' current ones);
        nothing changes where `found_inf` (a one-element fp32 tensor) is non-zero; gradients are divided by
        `grad_scale` (one fp32 element) inside the update kernel."""
        grads = grads if grads is not None else [p.grad for p in params]
        grads = self._replicas.gradients(params, grads) if self._replicas else [_local(g) for g in grads]
        steps = steps or self._steps
        batches: dict[tuple, tuple[dict, list, list, list, list]] = {}
        for p, grad in zip(params, grads):
            weight, exp_avg, exp_avg_sq = self._views[p]
            group = self._group_of[p]
            hyper = hypers[id(group)] if hypers is not None else _hyper(group)
            if self.triton_kernel and adamw_kernel.usable(weight, grad, exp_avg, exp_avg_sq):
                adamw_kernel.adamw_(weight, grad, exp_avg, exp_avg_sq, steps[weight.device], skip=found_inf,
                                    grad_scale=grad_scale, **hyper)
                continue
            if grad.dtype != weight.dtype:
                grad = grad.to(weight.dtype)
            key = (weight.device, weight.dtype, tuple(hyper.items()))
            lists = batches.setdefault(key, (hyper, [], [], [], []))
            for values, tensor in zip(lists[1:], (weight, grad, exp_avg, exp_avg_sq)):
                values.append(tensor)
        for (device, _, _), (hyper, weights, grads_, exp_avgs, exp_avg_sqs) in batches.items():
            torch._fused_adamw_(weights, grads_, exp_avgs, exp_avg_sqs, [], [steps[device]] * len(weights),
                                lr=hyper["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"],
                                weight_decay=hyper["weight_decay"], eps=hyper["eps"], amsgrad=False, maximize=False,
                                grad_scale=None if grad_scale is None else grad_scale.to(device),
                                found_inf=None if found_inf is None else found_inf.to(device))
        for p in params:
            if self.hold_gradients and p.grad is not None:
                self._held.append(p.grad)
            p.grad = None
        if self._replicas:
            self._replicas.gather(params)

    @torch.no_grad()
    def step(self, closure=None, found_inf: torch.Tensor | None = None, grad_scale: torch.Tensor | None = None
             ) -> None:
        """After the backward: update every parameter with a gradient (skipped on the device where `found_inf`, a
        one-element fp32 tensor, is non-zero; gradients divided by `grad_scale` inside the kernels: clipping).
        In-backward: finish the buckets whose gradients did not all arrive and join the side stream. Then advance
        the step counters."""
        if not self.in_backward:
            for bucket in self._buckets:
                with_grad = [p for p in bucket if p.grad is not None]
                now = [p for p in with_grad if p not in self._defer_group]
                if now:
                    self._update(now, found_inf=found_inf, grad_scale=grad_scale)
                for p in with_grad:
                    if p in self._defer_group:
                        self._hold_back(self._defer_group[p], [p], found_inf, grad_scale)
        for index, ready in enumerate(self._ready):  # buckets with a parameter that got no gradient this step
            if ready:
                self._complete(ready)
                self._ready[index] = []
        if self._side_stream is not None:
            torch.cuda.current_stream(self._side_stream.device).wait_stream(self._side_stream)
        self._held.clear()
        if self._held_back:
            self._run_queued()  # a previous step's held-back update that no forward has run yet
            self._queued = (self._held_back, {device: counter.clone() for device, counter in self._steps.items()},
                            {id(group): _hyper(group) for group in self.param_groups})
            self._held_back = {}
        for counter in self._steps.values():
            counter.add_(1.0 if found_inf is None else 1.0 - found_inf.to(counter.device).reshape(()))

    @torch.no_grad()
    def _run_queued(self, *_) -> None:
        """Launch the held-back updates in forward order (forward pre-hook of the start module), on the side stream
        if there is one, with an event after each group."""
        if self._queued is None:
            return
        work, steps, hypers = self._queued
        self._queued = None
        side = self._side_stream
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(side.device))  # the counter copies are made
        for group in sorted(work):
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for params, grads, found_inf, grad_scale in work[group]:
                    self._update(params, grads, steps, found_inf, grad_scale, hypers)
            if side is not None:
                for _, grads, found_inf, grad_scale in work[group]:
                    # freed when `work` goes: their memory must outlive the update
                    for tensor in [*grads, found_inf, grad_scale]:
                        if tensor is not None:
                            tensor.record_stream(side)
                self._queued_done[group] = torch.cuda.Event()
                self._queued_done[group].record(side)
        if side is not None:
            for counter in steps.values():
                counter.record_stream(side)  # the same for the step counters' copies (made on the main stream)

    def _wait_queued(self, group: int, *_) -> None:
        """A held-back group's parameters are about to be read (forward pre-hook of its module): its update first."""
        self._run_queued()
        done = self._queued_done.pop(group, None)
        if done is not None:
            torch.cuda.current_stream(self._side_stream.device).wait_event(done)

    def flush(self) -> None:
        """Apply the held-back updates now (before the parameters are read outside a forward, e.g. saved)."""
        self._run_queued()
        for group in list(self._queued_done):
            self._wait_queued(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._views:
            p.grad = None

    def state_dict(self) -> dict:
        """torch's state dict, with "step" as torch's AdamW keeps it (steps taken; this optimizer's counters hold the
        next step's number), so checkpoints of either optimizer load into the other."""
        state_dict = super().state_dict()
        taken = {device: counter - 1 for device, counter in self._steps.items()}
        for index, p in enumerate(p for g in self.param_groups for p in g["params"]):
            # a tensor per parameter, as torch's: torch's loading keeps them as they are, and its step adds 1 to each
            state_dict["state"][index]["step"] = taken[self._views[p][0].device].clone()
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loading (casts, param-group values), then the values copied into the tensors this optimizer
        updates, so every reference (shared step counters, DTensor states) stays the one it holds."""
        self.flush()
        super().load_state_dict(state_dict)
        # torch's loading replaces the param-group dicts: the updates read the loaded ones (lr, weight decay), which
        # the LR scheduler sets from now on
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        for p, (weight, local_m, local_v) in self._views.items():
            loaded, (exp_avg, exp_avg_sq) = self.state[p], self._state_tensors[p]
            local_m.copy_(_local(loaded["exp_avg"]))
            local_v.copy_(_local(loaded["exp_avg_sq"]))
            self._steps[weight.device].copy_(torch.as_tensor(loaded["step"], dtype=torch.float32) + 1)
            self.state[p] = {"step": self._steps[weight.device], "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

    def state_bytes(self) -> int:
        return sum(m.numel() * m.element_size() + v.numel() * v.element_size() for _, m, v in self._views.values())


def _hyper(group: dict) -> dict:
    beta1, beta2 = group["betas"]
    return dict(lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]))


def _complete_buckets(params: list[torch.Tensor], buckets: list[list[torch.Tensor]] | None) -> list[list[torch.Tensor]]:
    """The given buckets restricted to `params`' plain tensors, plus one bucket for each remaining parameter (sharded
    DTensor parameters always alone: FSDP2 hands over their gradients one by one)."""
    groupable = {p for p in params if not _is_sharded(p)}
    result, placed = [], set()
    for bucket in buckets or []:
        members = [p for p in bucket if p in groupable and p not in placed]
        placed.update(members)
        if members:
            result.append(members)
    result += [[p] for p in params if p not in placed]
    return result


def layer_buckets(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """The trainable parameters of each decoder layer, one list per layer (the optimizer's update buckets)."""
    return [[p for p in layer.parameters() if p.requires_grad] for layer in decoder_layers(model)]


def _is_sharded(t: torch.Tensor) -> bool:
    """Whether `t` is a DTensor (an FSDP2-sharded parameter)."""
    return type(t).__name__ == "DTensor"


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a plain tensor as is)."""
    return t._local_tensor if _is_sharded(t) else t


def fsdp_fires_grad_hooks() -> bool:
    """Whether this torch's FSDP2 calls post-accumulate-grad hooks on sharded parameters after their reduce-scatter
    (newer releases do); if not, an optimizer in backward cannot see FSDP2 gradients."""
    import inspect

    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_collectives
    except ImportError:
        return False
    return "_post_accumulate_grad_hooks" in inspect.getsource(_fsdp_collectives)


def _deferred_updates(model: torch.nn.Module, options):
    """`AdamW(defer=...)` for options.defer: (input embeddings, [(module, its parameters), ...] for the last (or all)
    decoder layers and the output head, in forward order), or None with a note saying what is missing."""
    from trainer.perf import deferred_layer_count

    if options.defer == "none":
        return None
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    layers = decoder_layers(model)
    count = deferred_layer_count(options, len(layers))
    graphed = getattr(model, "_moe_graphed", set())
    reason = None
    if head is None or embeddings is None:
        reason = "a model with input embeddings and an output head"
    elif {id(p) for p in head.parameters()} & {id(p) for p in embeddings.parameters()}:
        reason = "an output head not tied to the input embeddings (the next forward reads those first)"
    elif any(_is_sharded(p) for p in model.parameters()):
        reason = "unsharded parameters"
    elif count > len(layers):
        reason = f"no more deferred layers than the model's {len(layers)}"
    elif any(id(layer) in graphed for layer in layers[len(layers) - count:]):
        reason = "the deferred layers compiled without CUDA graphs (apply_optimizations with the same options)"
    if reason:
        options.notes.append(f"defer={options.defer} needs {reason}: off")
        return None
    modules = layers[len(layers) - count:] + [head]
    groups = [(m, [p for p in m.parameters() if p.requires_grad]) for m in modules]
    what = ("the output head's update" if not count else "the updates of every layer and the output head"
            if count == len(layers) else f"the updates of the last {count} layers and the output head")
    options.notes.append(f"{what} held back to the next forward")
    return embeddings, groups


def _triton_adamw(options, params: list[torch.Tensor]) -> bool:
    """Whether the update uses the Triton kernel (options.adamw == "triton" and it can run here)."""
    if options.adamw != "triton":
        return False
    if not any(_local(p).is_cuda for p in params) or not adamw_kernel.available():
        options.notes.append("Triton AdamW needs triton and CUDA parameters: torch's fused AdamW kernel")
        return False
    return True


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, options) -> AdamW:
    """AdamW over the trainable parameters as the recipe's `optim` section and the resolved `perf` options say."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    in_backward = options.in_backward
    if in_backward and any(_is_sharded(p) for p in params) and not fsdp_fires_grad_hooks():
        # older FSDP2 writes sharded gradients itself after its reduce-scatter and calls no per-parameter hook
        options.notes.append("optimizer in backward needs an FSDP2 that calls post-accumulate-grad hooks "
                             "(not this torch): AdamW after the backward")
        in_backward = False
        options.optimizer = "after-backward"
    replicas = replica_gradients(model)
    if replicas is not None and not in_backward:
        raise ValueError("a replicated model needs the optimizer that averages its gradients in the backward: "
                         "perf.optimizer=in-backward or overlap")
    overlap = in_backward and options.optimizer == "overlap"
    return AdamW(groups, cfg.lr, cfg.betas, cfg.eps, in_backward=in_backward, overlap=overlap,
                 buckets=layer_buckets(model),
                 # CUDA-graph memory is reused in stream order: only a side stream needs the hold
                 hold_gradients=overlap and bool(getattr(model, "_moe_graphed", None)),
                 triton_kernel=_triton_adamw(options, params), replicas=replicas,
                 defer=_deferred_updates(model, options))


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Factor on the peak lr for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """LambdaLR applying `lr_multiplier`; its state (last_epoch) is checkpointed with the optimizer."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    )
