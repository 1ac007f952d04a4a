"""Enumerate layouts, keep those that fit, rank them by estimated tokens/s per GPU, and print the table."""

from __future__ import annotations

from dataclasses import dataclass, replace

from trainer.planner.cost import StepEstimate, estimate_step
from trainer.planner.hardware import GPU, GiB
from trainer.planner.layout import CHECKPOINTING, Layout, PlanOptions
from trainer.planner.memory import MemoryEstimate, estimate_memory
from trainer.planner.model_shape import ModelShape

MICRO_BATCHES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    step: StepEstimate
    headroom_gib: float

    @property
    def fits(self) -> bool:
        return self.headroom_gib >= 0


def headroom_gib(memory: MemoryEstimate, gpu: GPU) -> float:
    """GiB left after the peak, the allocator's fragmentation and the memory torch does not count (context, NCCL)."""
    return gpu.memory_gib - gpu.reserve_gib - memory.total_gib * (1 + gpu.fragmentation)


def evaluate(shape: ModelShape, layout: Layout, gpu: GPU, options: PlanOptions,
             implementation: str = "moe_fast") -> Candidate:
    memory = estimate_memory(shape, layout, options)
    return Candidate(layout, memory, estimate_step(shape, layout, gpu, options, implementation),
                     headroom_gib(memory, gpu))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(shape: ModelShape, base: Layout, micro_batches=MICRO_BATCHES,
                      checkpointing=CHECKPOINTING) -> list[Layout]:
    """Every (dp_shard, ep_size, micro_batch, checkpointing, reshard_after_forward) for base.world_size GPUs that
    the mesh rule allows (keeping the gathered weights only matters where FSDP2 shards, dp_shard > 1)."""
    layouts = []
    for dp_shard in _divisors(base.world_size):
        for ep in _divisors(dp_shard):
            if shape.num_experts % ep:
                continue
            for mb in sorted(set(micro_batches) | {base.micro_batch}):
                for ckpt in checkpointing:
                    for reshard in ((True, False) if dp_shard > 1 else (True,)):
                        layouts.append(replace(base, dp_shard=dp_shard, ep_size=ep, micro_batch=mb,
                                               checkpointing=ckpt, reshard_after_forward=reshard))
    return layouts


def plan(shape: ModelShape, base: Layout, gpu: GPU, options: PlanOptions | None = None,
         implementation: str = "moe_fast", micro_batches=MICRO_BATCHES) -> list[Candidate]:
    """All candidate layouts, those that fit first, each group by estimated tokens/s per GPU (best first)."""
    options = options or PlanOptions()
    candidates = [evaluate(shape, layout, gpu, options, implementation)
                  for layout in candidate_layouts(shape, base, micro_batches)]
    return sorted(candidates, key=lambda c: (not c.fits, -c.step.tokens_per_s, -c.headroom_gib))


def best_fit(candidates: list[Candidate]) -> Candidate | None:
    return next((c for c in candidates if c.fits), None)


TABLE_COLUMNS = ("params", "grads", "optimizer", "activations", "loss", "comm", "workspace")


def format_table(candidates: list[Candidate], gpu: GPU, mark: Layout | None = None) -> str:
    """One line per layout: per-rank GiB by component, peak, headroom, estimated tok/s/GPU and MFU."""
    head = f"{'layout':<40} " + " ".join(f"{c[:6]:>6}" for c in TABLE_COLUMNS)
    head += f" {'peak':>6} {'at':>5} {'free':>6} {'tok/s':>7} {'MFU':>5}"
    lines = [head, "-" * len(head)]
    for cand in candidates:
        name = ("* " if mark is not None and cand.layout == mark else "  ") + cand.layout.describe()
        row = f"{name:<40} " + " ".join(f"{cand.memory.gib(c):6.1f}" for c in TABLE_COLUMNS)
        row += f" {cand.memory.total_gib:6.1f} {cand.memory.phase:>5} {cand.headroom_gib:6.1f}"
        row += f" {cand.step.tokens_per_s:7.0f} {cand.step.mfu * 100:4.0f}%"
        lines.append(row)
    return "\n".join(lines)


def describe_memory(memory: MemoryEstimate) -> str:
    parts = ", ".join(f"{name} {memory.gib(name):.1f}" for name in TABLE_COLUMNS if memory.components.get(name))
    kinds = ", ".join(f"{k} {v / GiB:.1f}" for k, v in memory.activations_by_kind.items())
    return f"{memory.total_gib:.1f} GiB at the {memory.phase} peak ({parts}); saved activations without " \
           f"checkpointing by block type: {kinds}"
