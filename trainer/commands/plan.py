"""`moe plan RECIPE [key=value ...] --gpus N --gpu-mem GiB`: per-GPU memory and the layouts that fit, ranked.

Reads only the model config (no weights): prints the recipe's own layout with its memory by component, then the
layouts that fit ranked by estimated tokens/s per GPU, and the overrides that select the best one.
"""

from __future__ import annotations

import argparse
import json

from trainer.errors import UserError
from trainer.planner import api


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a preset name or a recipe YAML path")
    parser.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides, e.g. data.seq_len=8192")
    parser.add_argument("--gpus", type=int, default=None, help="number of GPUs (default: one node of the preset)")
    parser.add_argument("--gpu", default="H100-80GB", help="node preset: H100-80GB or H200-141GB (default H100-80GB)")
    parser.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU (overrides the preset's memory)")
    parser.add_argument("--top", type=int, default=12, help="how many fitting layouts to print (default 12)")
    parser.add_argument("--capacity-factor", type=float, default=None,
                        help="rows the busiest EP rank receives over the mean (default 1.25)")
    parser.add_argument("--implementation", choices=("moe_fast", "hf_native"), default="moe_fast",
                        help="whose throughput the cost model assumes (default moe_fast)")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the full table as JSON here")


def run(args: argparse.Namespace) -> int:
    report = api.plan_recipe(
        args.recipe, args.overrides, gpus=args.gpus, gpu=args.gpu, gpu_mem_gib=args.gpu_mem,
        capacity_factor=args.capacity_factor, implementation=args.implementation,
    )
    print(api.format_report(report, top=args.top))
    if args.json_path:
        with open(args.json_path, "w") as out:
            json.dump(api.report_to_dict(report), out, indent=2)
    if report.best is None:
        raise UserError(f"no layout fits {report.request.shape.name or 'the model'} on {report.world_size} x "
                        f"{report.gpu.memory_gib:g} GiB", "use more GPUs, a larger GPU, or a shorter data.seq_len")
    return 0
