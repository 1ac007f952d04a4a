"""AdamW for the benchmark's training step, as `PerfOptions.optimizer` / `.adamw` / `.master` say.

    optimizer = build_optimizer(model, options, lr=1e-4)   # .step() / .zero_grad() (no-ops when stepping in backward)

"foreach" / "fused": `torch.optim.AdamW`. "in-backward" / "overlap" (and any fp32-master run): `_PerParamAdamW`,
which updates each decoder layer's parameters as soon as their gradients are complete (on a side stream with
"overlap"), and averages a replicated model's gradients across its replicas (`trainer.parallel.replicate`).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from trainer.kernels import adamw as adamw_kernel
from trainer.parallel.replicate import replica_gradients
from trainer.perf import PerfOptions, decoder_layers, deferred_layer_count


class _PerParamAdamW:
    """AdamW on each parameter's own state tensors (the fused AdamW kernel, called directly), optionally on an fp32
    master copy (bf16 params, fp32 weights + states).

    `in_backward=True` steps parameters from post-accumulate-grad hooks and frees their gradients at once, so only a
    few gradients exist at any time. Parameters are updated in buckets, one per decoder layer (and one for each
    parameter outside the layers): the bucket's update is one multi-tensor kernel launch once the last of its
    gradients is complete, instead of one launch per parameter. A bucket whose gradients did not all arrive (a
    parameter unused this step) is updated by `step()`. Otherwise `step()` walks the buckets in order (the fp32 copy
    of a gradient is made per bucket, never for all at once).

    `overlap=True` (CUDA, with in_backward) launches each update on one side stream that first waits for the
    gradients; the backward goes on meanwhile. This is safe because autograd fires the hook only after the
    parameter's last use in the backward (its gradient is complete), the gradients' memory is kept until the side
    stream is done with it (`record_stream`, or a reference held until `step()` with `hold_gradients`), and `step()`
    makes the compute stream wait for every update before the next forward reads the parameters.

    `hold_gradients=True` keeps every gradient referenced until `step()`: needed when gradients live in a CUDA-graph
    memory pool (compiled layers replayed as CUDA graphs), which reuses memory that no tensor references within the
    same step and knows nothing of the side stream.

    `replicas`: a replicated model's gradient sharing (`trainer.parallel.replicate.ReplicaGradients`). Each bucket's
    gradients are averaged across the replicas right before their update, in the same stream, so the communication
    of one layer runs under the backward of the next; with a sharded optimizer each rank updates its slice of each
    parameter, then the slices are all-gathered.

    `defer=(start_module, [(use_module, params), ...])` holds the updates of those parameters back from the backward
    (the output head and the last decoder layers: their gradients come first in the backward and the next forward
    reads them last). `step()` queues them with a copy of the step counter; the next forward launches them when
    `start_module` runs (the input embeddings; on the side stream with `overlap`, under the first decoder layers) and
    waits for each group's update just before its `use_module` runs. The updates are the same, only later; their
    gradients live until then. `flush()` applies queued updates at once (before reading the parameters elsewhere).

    All parameters step together, so they share one step counter per device (advanced by `step()` once every
    parameter has been updated). Sharded (DTensor) parameters are updated one by one through their local shards, in
    the stream where FSDP2 calls the hook. The update is `torch.optim.AdamW(fused=True)`'s: its kernel, or with
    `triton_kernel=True` the same update as one Triton kernel per CUDA tensor (`trainer.kernels.adamw`, which streams
    large tensors at about twice the speed and writes an fp32 master copy's bf16 weight in the same pass).
    """

    def __init__(self, params, lr: float, betas, eps: float, weight_decay: float, master_fp32: bool, in_backward: bool,
                 overlap: bool = False, buckets: list[list[torch.nn.Parameter]] | None = None,
                 hold_gradients: bool = False, triton_kernel: bool = False, triton_launch: dict | None = None,
                 replicas=None, defer=None):
        self.master_fp32, self.in_backward, self.hold_gradients = master_fp32, in_backward, hold_gradients
        self.hyper = dict(lr=lr, beta1=betas[0], beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=False,
                          maximize=False)
        self.triton_kernel, self.triton_launch = triton_kernel, triton_launch
        self._replicas = replicas  # a replica's gradient sharing (trainer.parallel.replicate.ReplicaGradients) or None
        self._kernel_hyper = {k: self.hyper[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay")}
        self._entries = {}
        self._steps = {}  # device -> shared step counter (fp32 scalar, as the fused kernel reads it)
        self._side_stream = None
        self._held: list[torch.Tensor] = []
        # deferred updates: parameter -> its group (forward order); per group the held-back (params, gradients)
        self._defer_group = {p: g for g, (_, group) in enumerate(defer[1]) for p in group} if defer else {}
        self._held_back: dict[int, list[tuple[list, list]]] = {}
        self._queued = None  # (held-back work, step counter copies) for the next forward
        self._queued_done: dict[int, object] = {}  # group -> CUDA event on the side stream: its update is done
        if defer:
            start_module, groups = defer
            start_module.register_forward_pre_hook(torch.compiler.disable(self._run_queued))
            for g, (use_module, _) in enumerate(groups):
                # outside any compiled region (a graph break in a compiled module's call, before its forward)
                use_module.register_forward_pre_hook(torch.compiler.disable(functools.partial(self._wait_queued, g)))
        params = list(params)
        for p in params:
            local = self._replicas.view_of(p) if self._replicas else _local(p).detach()  # the part updated here
            own_copy = master_fp32 and p.dtype != torch.float32
            target = local.float().clone() if own_copy else local
            if local.device not in self._steps:
                self._steps[local.device] = torch.ones((), dtype=torch.float32, device=local.device)
            self._entries[p] = (target, torch.zeros_like(target), torch.zeros_like(target), own_copy, local)
            if in_backward:
                p.register_post_accumulate_grad_hook(self._on_gradient)
            if overlap and in_backward and p.is_cuda and self._side_stream is None:
                self._side_stream = torch.cuda.Stream(device=p.device)
        self._buckets = _complete_buckets(params, buckets)
        self._bucket_of = {p: i for i, bucket in enumerate(self._buckets) for p in bucket}
        self._ready: list[list[torch.Tensor]] = [[] for _ in self._buckets]

    @torch.no_grad()
    def _on_gradient(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if _is_sharded(p):
            # FSDP2 calls this hook on its reduce-scatter stream, after the gradient's reduce-scatter: the update
            # already runs beside the backward, in the stream that owns the gradient's memory; the end of the
            # backward waits for that stream before the next forward
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
        # the gradients stay referenced here (a zero_grad() may drop .grad) until their update is queued
        self._held_back.setdefault(group, []).append((params, [p.grad for p in params]))
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

    def _update(self, params: list[torch.Tensor], grads: list[torch.Tensor] | None = None, steps=None) -> None:
        """Update `params` from `grads` (default: their .grad) with the step counters `steps` (default: the live
        ones). A replica's gradients are averaged first (for a sharded optimizer: only this rank's slices)."""
        grads = grads if grads is not None else [p.grad for p in params]
        grads = self._replicas.gradients(params, grads) if self._replicas else [_local(g) for g in grads]
        steps = steps or self._steps
        groups: dict[tuple, tuple[list, list, list, list]] = {}
        copied = set()  # parameters whose weight the Triton kernel already wrote
        for p, grad in zip(params, grads):
            target, exp_avg, exp_avg_sq, own_copy, weight = self._entries[p]
            if self.triton_kernel and adamw_kernel.usable(target, grad, exp_avg, exp_avg_sq, weight):
                adamw_kernel.adamw_(target, grad, exp_avg, exp_avg_sq, steps[target.device],
                                    shadow=weight if own_copy else None, config=self.triton_launch,
                                    **self._kernel_hyper)
                copied.add(p)
                continue
            if grad.dtype != target.dtype:
                grad = grad.to(target.dtype)
            lists = groups.setdefault((target.device, target.dtype), ([], [], [], []))
            for values, tensor in zip(lists, (target, grad, exp_avg, exp_avg_sq)):
                values.append(tensor)
        for (device, _), (targets, grads, exp_avgs, exp_avg_sqs) in groups.items():
            torch._fused_adamw_(targets, grads, exp_avgs, exp_avg_sqs, [], [steps[device]] * len(targets),
                                **self.hyper)
        for p in params:
            target, _, _, own_copy, weight = self._entries[p]
            if own_copy and p not in copied:
                weight.copy_(target)
            if self.hold_gradients and p.grad is not None:
                self._held.append(p.grad)
            p.grad = None
        if self._replicas:
            self._replicas.gather(params)

    @torch.no_grad()
    def step(self) -> None:
        if not self.in_backward:
            for bucket in self._buckets:
                with_grad = [p for p in bucket if p.grad is not None]
                if with_grad:
                    self._update(with_grad)
        for index, ready in enumerate(self._ready):  # buckets with a parameter that got no gradient this step
            if ready:
                self._complete(ready)
                self._ready[index] = []
        if self._side_stream is not None:
            torch.cuda.current_stream(self._side_stream.device).wait_stream(self._side_stream)
        self._held.clear()
        if self._held_back:
            self._run_queued()  # a previous step's held-back update that no forward has run yet
            self._queued = (self._held_back, {device: counter.clone() for device, counter in self._steps.items()})
            self._held_back = {}
        for counter in self._steps.values():
            counter.add_(1)

    @torch.no_grad()
    def _run_queued(self, *_) -> None:
        """Launch the held-back updates in forward order (forward pre-hook of the start module), on the side stream
        if there is one, with an event after each group."""
        if self._queued is None:
            return
        work, steps = self._queued
        self._queued = None
        side = self._side_stream
        if side is not None:
            side.wait_stream(torch.cuda.current_stream(side.device))  # the counter copies are made
        for group in sorted(work):
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for params, grads in work[group]:
                    self._update(params, grads, steps)
            if side is not None:
                for _, grads in work[group]:
                    for grad in grads:
                        grad.record_stream(side)  # freed when `work` goes: its memory must outlive the update
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
        for p in self._entries:
            p.grad = None

    def state_bytes(self) -> int:
        total = 0
        for target, exp_avg, exp_avg_sq, own_copy, _ in self._entries.values():
            total += (target.numel() * target.element_size()) if own_copy else 0
            total += exp_avg.numel() * exp_avg.element_size() + exp_avg_sq.numel() * exp_avg_sq.element_size()
        return total


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


def _deferred_updates(model: torch.nn.Module, options: PerfOptions, in_backward: bool):
    """`_PerParamAdamW(defer=...)` for options.defer: (input embeddings, [(module, its parameters), ...] for the last
    decoder layers and the output head, in forward order), or None with a note saying what is missing."""
    if options.defer == "none":
        return None
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    layers = decoder_layers(model)
    count = deferred_layer_count(options)
    graphed = getattr(model, "_moe_graphed", set())
    reason = None
    if not in_backward:
        reason = "an in-backward optimizer (opt-in-bwd / opt-overlap)"
    elif head is None or embeddings is None:
        reason = "a model with input embeddings and an output head"
    elif {id(p) for p in head.parameters()} & {id(p) for p in embeddings.parameters()}:
        reason = "an output head not tied to the input embeddings (the next forward reads those first)"
    elif any(_is_sharded(p) for p in model.parameters()):
        reason = "unsharded parameters"
    elif count >= len(layers):
        reason = f"fewer deferred layers than the model's {len(layers)}"
    elif any(id(layer) in graphed for layer in layers[len(layers) - count:]):
        reason = "the deferred layers compiled without CUDA graphs (apply_optimizations with the same options)"
    if reason:
        options.notes.append(f"defer={options.defer} needs {reason}: off")
        return None
    modules = layers[len(layers) - count:] + [head]
    groups = [(m, [p for p in m.parameters() if p.requires_grad]) for m in modules]
    what = "the output head's update" if not count else f"the updates of the last {count} layers and the output head"
    options.notes.append(f"{what} held back to the next forward")
    return embeddings, groups


@contextlib.contextmanager
def step_stream(options: PerfOptions, device: torch.device):
    """Run the training steps inside this: with `options.step_priority == "high"` (settled by `apply_optimizations`)
    on CUDA they go to a stream of the highest priority, joined with the caller's stream on entry and exit. The
    overlapped optimizer's side stream, at the default priority, then gets only the SMs that the step's kernels leave
    free; at equal priority a large update grid holds back the step's next kernel until it drains. The layers' CUDA
    graphs keep the priority they were captured at (`graph_priority`); this covers the kernels launched outside
    them."""
    if options.step_priority != "high" or device.type != "cuda":
        yield
        return
    caller = torch.cuda.current_stream(device)
    high = torch.cuda.Stream(device=device, priority=-100)  # out of range: torch maps it to the highest
    high.wait_stream(caller)
    try:
        with torch.cuda.stream(high):
            yield
    finally:
        caller.wait_stream(high)


def _triton_adamw(options: PerfOptions, params: list[torch.Tensor]) -> bool:
    """Whether the per-parameter AdamW uses the Triton kernel (options.adamw == "triton" and it can run here)."""
    if options.adamw != "triton":
        return False
    if not any(_local(p).is_cuda for p in params) or not adamw_kernel.available():
        options.notes.append("Triton AdamW needs triton and CUDA parameters: torch's fused AdamW kernel")
        return False
    return True


def build_optimizer(model: torch.nn.Module, options: PerfOptions, lr: float = 1e-4, betas=(0.9, 0.95),
                    eps: float = 1e-8, weight_decay: float = 0.0):
    """AdamW as `options.optimizer` / `options.master` say. Has .step() and .zero_grad(set_to_none=True)."""
    params = [p for p in model.parameters() if p.requires_grad]
    in_backward = options.optimizer in ("in-backward", "overlap")
    overlap = options.optimizer == "overlap"
    if in_backward and any(_is_sharded(p) for p in params) and not fsdp_fires_grad_hooks():
        # older FSDP2 writes sharded gradients itself after its reduce-scatter and calls no per-parameter hook
        options.notes.append("optimizer in backward needs an FSDP2 that calls post-accumulate-grad hooks "
                             "(not this torch): fused AdamW")
        in_backward = False
    replicas = replica_gradients(model)
    if replicas is not None and not (in_backward or options.master == "fp32"):
        raise ValueError("a replicated model needs the optimizer that averages its gradients: add opt-in-bwd or "
                         "opt-overlap to the options")
    defer = _deferred_updates(model, options, in_backward)
    if in_backward or options.master == "fp32":
        return _PerParamAdamW(params, lr, betas, eps, weight_decay, options.master == "fp32", in_backward,
                              overlap=overlap, buckets=layer_buckets(model),
                              # CUDA-graph memory is reused in stream order: only a side stream needs the hold
                              hold_gradients=options.compile == "layers-graphs" and overlap,
                              triton_kernel=_triton_adamw(options, params),
                              triton_launch=adamw_kernel.launch_config(options.adamw_launch), replicas=replicas,
                              defer=defer)
    on_cuda = all(p.is_cuda for p in params)
    kind = {"fused": True} if options.optimizer in ("fused", "in-backward") and on_cuda else {"foreach": True}
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kind)
