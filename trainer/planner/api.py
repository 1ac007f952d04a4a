"""`moe plan` as a function: recipe in, ranked layouts out."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trainer.planner.cost import model_flops_per_token
from trainer.planner.fit_check import PlanRequest, request_from_recipe
from trainer.planner.hardware import GPU, gpu_preset, gpu_with_memory
from trainer.planner.search import Candidate, best_fit, describe_memory, evaluate, format_table, plan


@dataclass
class PlanReport:
    request: PlanRequest
    gpu: GPU
    world_size: int
    current: Candidate
    candidates: list[Candidate]
    implementation: str

    @property
    def best(self) -> Candidate | None:
        return best_fit(self.candidates)


def load_recipe_any(recipe: str, overrides: list[str] | None = None):
    """The recipe through trainer.config.load_recipe (presets, YAML paths, dotted overrides, validation)."""
    from trainer.config import load_recipe

    return load_recipe(recipe, list(overrides or []))


def plan_recipe(recipe: str, overrides: list[str] | None = None, *, gpus: int | None = None,
                gpu: str = "H100-80GB", gpu_mem_gib: float | None = None, capacity_factor: float | None = None,
                implementation: str = "moe_fast") -> PlanReport:
    """Plan a recipe (preset name or YAML path, with key=value overrides) on `gpus` GPUs of a node preset."""
    node = gpu_preset(gpu) if gpu_mem_gib is None else gpu_with_memory(gpu_mem_gib, like=gpu)
    world = gpus or node.gpus_per_node
    config = load_recipe_any(recipe, overrides)
    request = request_from_recipe(config, world, gpu=node, capacity_factor=capacity_factor)
    current = evaluate(request.shape, request.layout, node, request.options, implementation)
    candidates = plan(request.shape, request.layout, node, request.options, implementation)
    return PlanReport(request, node, world, current, candidates, implementation)


def format_report(report: PlanReport, top: int = 12) -> str:
    shape, opts = report.request.shape, report.request.options
    active = model_flops_per_token(shape, report.request.layout.seq_len) / 6
    lines = [
        f"model {shape.name or shape.family} ({shape.family}): {len(shape.layers)} layers, "
        f"{shape.total_params / 1e9:.2f}B params ({shape.expert_params / 1e9:.2f}B in experts), "
        f"~{active / 1e9:.2f}B active per token (incl. attention FLOPs)",
        f"job: {report.world_size} x {report.gpu.name} ({report.gpu.memory_gib:g} GiB), seq {report.request.layout.seq_len}, "
        f"precision {opts.precision}, grad accum {opts.grad_accum_steps}, EP capacity factor {opts.capacity_factor:g}, "
        f"{'fused' if opts.optimizer_fused else 'foreach'} AdamW, throughput of {report.implementation}",
        "",
    ]
    if report.request.layout_error:
        lines.append(f"recipe layout  impossible here ({report.request.layout_error})")
    else:
        lines += [
            f"recipe layout  {report.current.layout.describe()}: {describe_memory(report.current.memory)}",
            f"               headroom {report.current.headroom_gib:.1f} GiB -> "
            + ("fits" if report.current.fits else "DOES NOT FIT")
            + f", ~{report.current.step.tokens_per_s:,.0f} tok/s/GPU",
        ]
    lines.append("")
    fitting = [c for c in report.candidates if c.fits][:top]
    if fitting:
        mark = None if report.request.layout_error else report.request.layout
        lines.append("layouts that fit, fastest first (GiB per GPU; * = the recipe's layout):")
        lines.append(format_table(fitting, report.gpu, mark=mark))
        lines.append("")
        lines.append(f"best: {report.best.layout.overrides(report.request.layout)}")
    else:
        lines.append("no layout fits")
    return "\n".join(lines)


def report_to_dict(report: PlanReport) -> dict:
    def row(c: Candidate) -> dict:
        return {
            "layout": asdict(c.layout), "fits": c.fits, "headroom_gib": c.headroom_gib,
            "peak_gib": c.memory.total_gib, "peak_phase": c.memory.phase,
            "components_gib": {k: v / 2**30 for k, v in c.memory.components.items()},
            "tokens_per_s_per_gpu": c.step.tokens_per_s, "mfu": c.step.mfu,
        }

    return {"gpu": asdict(report.gpu), "world_size": report.world_size, "current": row(report.current),
            "candidates": [row(c) for c in report.candidates]}
