"""What a training step is worth: tokens/s, FLOPs and MFU, memory, expert load; and where metrics go.

FLOPs per trained token (forward + backward) come from the model config, one formula for the training loop, the
benchmark and MFU: see `trainer/flops.py` (only the top-k routed experts count; causal attention at half; Mamba2
state terms for hybrid models).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

from trainer.flops import flops_per_token as config_flops_per_token
from trainer.moe.z_loss import in_backward


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context `seq_len` (see trainer/flops.py)."""
    return config_flops_per_token(model.config, seq_len)


def peak_memory_gib() -> float:
    """Peak accelerator memory allocated by torch (GPU), or the process's peak resident set size (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class ExpertLoadTracker:
    """Counts tokens per expert per MoE layer from the routers' outputs `(router_logits, weights, indices)`.

    Each router gets a fixed fp32 buffer [E] (not saved with the model) that a forward hook adds its routed indices
    into with `index_add_`: no host synchronisation (`torch.bincount` reads the indices' range back on CUDA). The hook
    runs outside torch.compile (`torch.compiler.disable`: a compiled layer calls it between two graphs), so no
    compiled graph or CUDA graph mutates the counts; with `traced` it is traced into the compiled layer instead (one
    graph per layer, which CUDA-graph layers need: between two graphs it split each layer's graph in two).
    `snapshot()` queues a copy of the counts since the last snapshot
    (and zeroes them) on the device; `add(counts_LE)` adds a step's copy, once it is on the host, to the run's
    total. `recomputes`: the model recomputes router forwards in the backward (activation
    checkpointing); those calls are then not counted (a check that stays out of the hook otherwise, since torch.compile
    cannot trace it).
    """

    def __init__(self, model: torch.nn.Module, recomputes: bool = False, traced: bool = False):
        adapter = getattr(model, "moe_adapter", None)
        routers = adapter.router_modules(model) if adapter is not None else []
        if not routers:
            routers = [m for m in model.modules() if "router" in type(m).__name__.lower()]
        self.routers = [r for r in routers if _num_experts_of(r)]
        self.num_layers = len(self.routers)
        self.total_LE: torch.Tensor | None = None
        for router in self.routers:
            weight = next(router.parameters())
            router.register_buffer("_moe_expert_counts_E", torch.zeros(_num_experts_of(router), device=weight.device),
                                   persistent=False)
        if recomputes:  # torch.compile cannot trace the recompute check
            hook = torch.compiler.disable(_count_hook_outside_backward)
        else:
            hook = _count_hook if traced else torch.compiler.disable(_count_hook)
        self._handles = [r.register_forward_hook(hook) for r in self.routers]

    def snapshot(self) -> torch.Tensor | None:
        """The counts since the last snapshot, [L, E] on the device (queued, not read), or None without routers."""
        if not self.routers:
            return None
        with torch.no_grad():
            counts_LE = torch.stack([r._moe_expert_counts_E for r in self.routers])
            for router in self.routers:
                router._moe_expert_counts_E.zero_()
        return counts_LE

    def add(self, counts_LE: torch.Tensor) -> None:
        """Add one step's counts (on the host) to the run's total."""
        counts_LE = counts_LE.float()
        self.total_LE = counts_LE.clone() if self.total_LE is None else self.total_LE + counts_LE

    def pop(self) -> torch.Tensor | None:
        """The counts since the last call on the CPU (synchronising), also added to the run's total."""
        counts_LE = self.snapshot()
        if counts_LE is None:
            return None
        counts_LE = counts_LE.float().cpu()
        self.add(counts_LE)
        return counts_LE

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _num_experts_of(router: torch.nn.Module) -> int:
    """Rows of the router's weight [E, H] (its expert count), or 0 for a module without one."""
    weight = getattr(router, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.ndim == 2 else 0


def _count_hook_outside_backward(module: torch.nn.Module, inputs, output) -> None:
    if not in_backward():
        _count_hook(module, inputs, output)


def _count_hook(module: torch.nn.Module, inputs, output) -> None:
    if not isinstance(output, tuple) or len(output) < 3:
        return
    indices = output[2]
    if not isinstance(indices, torch.Tensor) or indices.is_floating_point():
        return
    flat = indices.reshape(-1).long()
    with torch.no_grad():
        module._moe_expert_counts_E.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))


def imbalance(counts_LE: torch.Tensor) -> list[float]:
    """Per layer, max tokens on one expert / mean tokens per expert (1.0 = perfectly balanced)."""
    mean = counts_LE.mean(dim=1).clamp_min(1e-9)
    return (counts_LE.max(dim=1).values / mean).tolist()


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl, and mirrors scalars to TensorBoard if installed and
    to `logger` (e.g. `trainer.tracking.open_wandb`: anything with `log(record)` and `close()`) if given."""

    def __init__(self, run_dir: Path, resume_step: int = 0, logger=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.logger = logger
        self._truncate_after(resume_step)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
        except Exception:  # tensorboard is optional (extra "tracking")
            self._tb = None

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps the checkpoint does not contain (they will be trained again). A line that
        is not JSON (the last one, cut short by a kill mid-write) is dropped too: it is a step being trained again."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text(errors="replace").splitlines()
                if (record := _parse(line)) is not None and record.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)  # a kill now leaves the old file or the new one, never a half

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])
        if self.logger is not None:
            self.logger.log(record)

    def close(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if self._tb is not None:
            self._tb.close()


def _parse(line: str) -> dict | None:
    """One metrics line as a dict, or None for a blank, cut-short or foreign line."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of `<run_dir>/metrics.jsonl` (lines that are not complete JSON objects are skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [record for line in path.read_text(errors="replace").splitlines() if (record := _parse(line)) is not None]
