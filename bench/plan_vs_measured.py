"""Predicted (`moe plan`'s memory model) vs measured peak memory of `moe train` on one GPU.

Each configuration is a benchmark job's recipe (bench/jobs.py) plus recipe overrides; `moe train` runs it for a few
steps in a fresh process, and its peak (`peak_memory_gib` in metrics.jsonl: torch.cuda.max_memory_allocated) is set
beside the planner's estimate for the same recipe (`trainer.planner.request_from_recipe`). Writes a JSON list of
rows to --out and prints a table.

    python -m bench.plan_vs_measured --out plan_vs_measured.json           # the default list below
    python -m bench.plan_vs_measured --out x.json --config "B1-bs1: model.config_overrides.num_hidden_layers=8"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

from bench.compare import run_ours
from bench.jobs import JOBS, write_job_recipe

GiB = 1024**3
DEFAULT_CONFIGS = [  # "job: overrides" (a mix of peaks at the optimizer step and at the start of the backward)
    "B1-bs1:",
    "B1-bs4:",
    "B1-bs4: parallel.activation_checkpointing=full",
    "B1-bs4: parallel.activation_checkpointing=moe model.config_overrides.num_hidden_layers=4",
    "B1-bs4: perf.optimizer=overlap optim.max_grad_norm=0",
    "B3:",
    "B3: train.micro_batch_size=4 parallel.activation_checkpointing=moe",
]


def predicted_gib(recipe_path: str, overrides: list[str]) -> tuple[float, str]:
    from trainer.config import load_recipe
    from trainer.planner import estimate_memory
    from trainer.planner.fit_check import request_from_recipe

    request = request_from_recipe(load_recipe(recipe_path, overrides), 1)
    memory = estimate_memory(request.shape, request.layout, request.options)
    return memory.total / GiB, memory.phase


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plan_vs_measured", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write the rows to")
    parser.add_argument("--config", action="append", help="'job: key=value ...' (repeatable); default: the list")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", default="runs/plan-vs-measured", help="where the runs go")
    args = parser.parse_args(argv)
    run_args = SimpleNamespace(warmup=0, steps=args.steps, timeout=600.0, profile=False)
    rows = []
    header = f"{'configuration':<90} {'predicted':>9} {'measured':>9} {'error':>7}  peak at"
    print(header + "\n" + "-" * len(header), flush=True)
    for index, text in enumerate(args.config or DEFAULT_CONFIGS):
        name, _, rest = text.partition(":")
        job, overrides = JOBS[name.strip()], rest.split()
        recipe = write_job_recipe(job, args.work, args.steps)
        predicted, phase = predicted_gib(recipe, overrides)
        result = run_ours(job, recipe, f"config{index}", overrides, run_args, os.path.join(args.work, job.name), 0)
        row = {"config": text, "predicted_gib": predicted, "predicted_phase": phase, "run_dir": result["run_dir"]}
        if "error" in result:
            row["error"] = result["error"]
            print(f"{text:<90} {predicted:9.1f} {'failed':>9}  {result['error'][:60]}", flush=True)
        else:
            row["measured_gib"] = result["peak_gib"]
            row["error_pct"] = 100 * (predicted - result["peak_gib"]) / result["peak_gib"]
            print(f"{text:<90} {predicted:9.1f} {result['peak_gib']:9.1f} {row['error_pct']:+6.1f}%  {phase}",
                  flush=True)
        rows.append(row)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
