"""`moe export RUN_DIR OUT_DIR`: a standard Hugging Face checkpoint from a run's latest (or any) checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="RUN_DIR",
                        help="a run directory (its latest checkpoint) or a checkpoints/step_* directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write the Hugging Face checkpoint (must be empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="weight dtype (auto: the run's output.export_dtype)")


def run(args: argparse.Namespace) -> int:
    from trainer.checkpoint.export import check_export_target
    from trainer.checkpoint.export_run import find_checkpoint, sources_of

    # Before any heavy work: never into (or over) the checkpoints it reads, never over someone else's files.
    check_export_target(args.out_dir, args.overwrite, keep=sources_of(find_checkpoint(Path(args.source))))
    from trainer.checkpoint.export_run import export_checkpoint

    out, step = export_checkpoint(Path(args.source), Path(args.out_dir), args.dtype, args.overwrite)
    print(f"exported step {step} to {out}")
    return 0

