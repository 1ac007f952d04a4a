"""`moe train RECIPE [key=value ...]`: fine-tune from a preset name or a YAML recipe, with dotted overrides."""

from __future__ import annotations

import argparse
import os

from trainer.config import list_presets, load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help=f"a recipe YAML path or a preset name ({', '.join(list_presets())})")
    # The CLI parses intermixed (trainer.cli), so flags may come before or after the overrides.
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")


def run(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    from trainer.train import train  # heavy imports only once the recipe is known to be valid

    result = train(recipe, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.preempted:
        print(f"stopped by {result.preempted} at step {result.step} (checkpoint saved)")
    elif result.losses:
        print(f"trained to step {result.step}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}")
    else:
        print(f"nothing to train: the run is already at step {result.step}")
    return 0
