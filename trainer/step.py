"""One training step: forward, loss, backward, gradient norm and clipping, skip, AdamW, LR schedule.

    step = TrainStep(model, optimizer, scheduler, rt, options, recipe.optim.max_grad_norm, tracker, balancer, z_loss)
    out = step(micro_batches)        # queued on the device; nothing is read back to the host
    values = out.fetch()             # later (after the next step is queued): floats, one wait for this step only

This is the step `moe train` runs, the benchmark's "ours" side measures (through `moe train`) and the GPU parity
tests check; the only other step in the project is the native transformers baseline the benchmark compares with.

Semantics: `grad_accum_steps` micro-batches; each loss is summed over trained tokens and divided by the trained
tokens of the whole step (all micro-batches, all ranks), so the gradient is the exact token mean however tokens fall
into micro-batches; the router aux loss (HF's, with the config's coefficient) and the router z-loss are averaged
over micro-batches. The gradient norm is taken before clipping (after the backward, or gradient by gradient during
the last micro-batch's backward: `perf.grad_norm`, the same value); a step whose loss or gradient norm is not finite is
skipped by the optimizer on the device (`AdamW.step(found_inf=...)`), and clipping is a divisor the update kernels
apply (`grad_scale`), so neither costs a pass over the gradients or a host sync. With an in-backward optimizer
(`perf.optimizer=in-backward|overlap`) the parameters are updated during the backward: the recipe must then have no
clipping and no accumulation (checked when it loads), and a non-finite step cannot be undone (it is reported).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from trainer.data import IGNORE_INDEX
from trainer.loss import forward_loss_sum
from trainer.optim import _is_sharded
from trainer.parallel.grad_norm import GradNormInBackward, total_grad_norm
from trainer.perf import PerfOptions, uses_cuda_graphs


@dataclass
class StepOutput:
    """One step's results, still on the device; `fetch()` reads them (after a copy queued when the step was)."""

    loss: torch.Tensor  # [] token-mean cross-entropy over the step (all ranks)
    grad_norm: torch.Tensor | None  # [] before clipping; None with an in-backward optimizer
    skipped: torch.Tensor  # [] 1.0 where the update was skipped (non-finite loss or gradient norm)
    expert_counts_LE: torch.Tensor | None  # tokens per expert per MoE layer this step, or None
    tokens: int  # input tokens of the step, all ranks
    lr: float
    _host: dict | None = None
    _ready: object = None  # CUDA event: the host copies are done

    def queue_host_copy(self) -> None:
        """Queue the copies to (pinned) host memory now, so a later `fetch()` waits for this step and not for work
        queued after it."""
        values = {"loss": self.loss, "skipped": self.skipped}
        if self.grad_norm is not None:
            values["grad_norm"] = self.grad_norm
        if self.expert_counts_LE is not None:
            values["expert_counts_LE"] = self.expert_counts_LE
        device = self.loss.device
        if device.type != "cuda":
            self._host = {k: v.detach() for k, v in values.items()}
            return
        # into pinned buffers: a device-to-host copy is asynchronous only into page-locked memory
        self._host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v.detach(), non_blocking=True)
                      for k, v in values.items()}
        self._ready = torch.cuda.Event(enable_timing=True)
        self._ready.record(torch.cuda.current_stream(device))

    def seconds_since(self, earlier: StepOutput | None) -> float | None:
        """Device time from the end of `earlier` to the end of this step (both fetched), or None off CUDA or without
        an earlier step. Unlike the host's clock between two reads, it charges host work done between queueing
        the steps (a profiler writing its trace, a checkpoint) to the step the device waited in, not the one after."""
        if earlier is None or self._ready is None or earlier._ready is None:
            return None
        return earlier._ready.elapsed_time(self._ready) / 1e3

    def fetch(self) -> dict:
        """{"loss", "grad_norm" (None in-backward), "skipped" (bool), "expert_counts_LE" (CPU tensor or None),
        "tokens", "lr"}; waits for this step's device work only."""
        if self._host is None:
            self.queue_host_copy()
        if self._ready is not None:
            self._ready.synchronize()
        host = self._host
        return {"loss": float(host["loss"]), "grad_norm": float(host["grad_norm"]) if "grad_norm" in host else None,
                "skipped": bool(host["skipped"]), "expert_counts_LE": host.get("expert_counts_LE"),
                "tokens": self.tokens, "lr": self.lr}


class TrainStep:
    """The training step of a built, parallelized, optimized model (see the module docstring).

    `tracker`, `balancer`, `z_loss` (optional hooks of `trainer.metrics` / `trainer.moe`): expert counts are
    snapshotted into the step's output, the aux-free balancer's update is applied on finite steps only, and the
    z-loss is added to each micro-batch's loss.
    """

    def __init__(self, model, optimizer, scheduler, rt, options: PerfOptions, max_grad_norm: float,
                 tracker=None, balancer=None, z_loss=None):
        self.model, self.optimizer, self.scheduler, self.rt, self.options = model, optimizer, scheduler, rt, options
        self.max_grad_norm = max_grad_norm
        self.tracker, self.balancer, self.z_loss = tracker, balancer, z_loss
        self.aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
        self.norm_in_backward = _norm_in_backward(model, optimizer, rt, options)

    def __call__(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepOutput:
        rt, accum = self.rt, len(micro_batches)
        lr = self.optimizer.param_groups[0]["lr"]
        num_targets = rt.all_reduce_sum(sum((b["targets"] != IGNORE_INDEX).sum() for b in micro_batches).float())
        denominator = num_targets.clamp_min(1)
        loss_sum = None  # in the loss's own dtype (fp32, or fp64 for an fp64 model)
        graphs = uses_cuda_graphs(self.model)
        for i, batch in enumerate(micro_batches):
            if self.norm_in_backward is not None and i == accum - 1:
                self.norm_in_backward.arm()  # the last backward: each gradient's norm as it completes
            if graphs:  # a new step of the layers' CUDA graphs: the previous replay's outputs may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            with rt.autocast():
                token_loss_sum, aux_loss = forward_loss_sum(self.model, batch, self.options.fused_ce)
            # gradient reductions average over ranks, so scale by the world size to get the global token mean
            loss = token_loss_sum * rt.world_size / denominator
            if aux_loss is not None and self.aux_coef:
                loss = loss + self.aux_coef * aux_loss / accum
            router_z = self.z_loss.pop() if self.z_loss is not None else None
            if router_z is not None:
                loss = loss + router_z / accum
            loss.backward()
            loss_sum = token_loss_sum.detach() if loss_sum is None else loss_sum + token_loss_sum.detach()
        mean_loss = rt.all_reduce_sum(loss_sum) / denominator
        if self.optimizer.in_backward:
            grad_norm, finite = None, torch.isfinite(mean_loss)
            not_finite = (~finite).float()  # reported only: the update is applied already
            self.optimizer.step()
        else:
            grad_norm = (self.norm_in_backward.total() if self.norm_in_backward is not None
                         else total_grad_norm(self.model.parameters())).to(mean_loss.device)
            finite = torch.isfinite(mean_loss) & torch.isfinite(grad_norm)
            not_finite = (~finite).float()
            # clipping as torch's clip_grad_norm_ (scale max_norm / (norm + 1e-6) where below 1), folded into the
            # update kernels as a divisor: no pass over the gradients of its own, nothing read on the host
            scale = (grad_norm.float() + 1e-6) / self.max_grad_norm if self.max_grad_norm > 0 else None
            self.optimizer.step(found_inf=not_finite, grad_scale=None if scale is None else scale.clamp(min=1.0))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        if self.balancer is not None:
            self.balancer.step(apply=1.0 - not_finite)
        counts = self.tracker.snapshot() if self.tracker is not None else None
        tokens = sum(b["input_ids"].numel() for b in micro_batches) * rt.world_size
        out = StepOutput(mean_loss, grad_norm, not_finite, counts, tokens, lr)
        out.queue_host_copy()
        return out


def _norm_in_backward(model, optimizer, rt, options: PerfOptions) -> GradNormInBackward | None:
    """`options.grad_norm == "in-backward"` where it can run (AdamW after the backward, one process, plain
    parameters), else None with a note saying why not."""
    if options.grad_norm != "in-backward" or optimizer.in_backward:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    if rt.world_size > 1 or any(_is_sharded(p) for p in params):
        options.notes.append("grad_norm=in-backward needs one process's plain (unsharded) parameters: after the "
                             "backward")
        options.grad_norm = "after-backward"
        return None
    options.notes.append("gradient norm taken during the backward, each gradient's as it completes")
    return GradNormInBackward(params)


class Prefetcher:
    """The loader's micro-batches on the device one step ahead: pinned host memory, non-blocking copies, so the copy
    and the loader's own work run while the previous step computes.

    `state_dict()` is the loader's position after the batches handed out so far (not the prefetched ones), so a
    checkpoint resumes exactly where training stopped."""

    def __init__(self, loader, device: torch.device, micro_batches: int, prefetch: bool):
        self.loader, self.device, self.micro_batches = loader, device, micro_batches
        self.prefetch = prefetch and device.type == "cuda"
        self._next = None  # (loader state before these batches, batches on the device)

    def _load(self) -> tuple[dict, list[dict[str, torch.Tensor]]]:
        state = self.loader.state_dict()
        batches = []
        for _ in range(self.micro_batches):
            batch = next(self.loader)
            if self.prefetch:
                batch = {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
            else:
                batch = {k: v.to(self.device) for k, v in batch.items()}
            batches.append(batch)
        return state, batches

    def __next__(self) -> list[dict[str, torch.Tensor]]:
        _, batches = self._next if self._next is not None else self._load()
        self._next = self._load() if self.prefetch else None
        return batches

    def state_dict(self) -> dict:
        return self._next[0] if self._next is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._next = None


@contextlib.contextmanager
def step_stream(options: PerfOptions, device: torch.device):
    """Run the training steps inside this: with `options.step_priority == "high"` (settled by `apply_optimizations`)
    on CUDA they go to a stream of the highest priority, joined with the caller's stream on entry and exit. The
    overlapped optimizer's side stream, at the default priority, then gets only the SMs that the step's kernels leave
    free. The layers' CUDA graphs keep the priority they were captured at (`graph_priority`); this covers the kernels
    launched outside them."""
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
