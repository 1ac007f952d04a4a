"""`moe models`: the recipe presets and the model families with a fast MoE path."""

from __future__ import annotations

import argparse

import yaml

from trainer.config import RECIPES_DIR, list_presets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets-only", action="store_true", help="list only the recipe presets")


def preset_summaries() -> list[tuple[str, str, str]]:
    """(name, model.name_or_path, first comment line) for every shipped recipe."""
    rows = []
    for name in list_presets():
        text = (RECIPES_DIR / f"{name}.yaml").read_text()
        model = (yaml.safe_load(text) or {}).get("model", {}).get("name_or_path", "?")
        comment = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
        rows.append((name, str(model), comment))
    return rows


def run(args: argparse.Namespace) -> int:
    print("presets (moe train <name> [key=value ...]):")
    for name, model, comment in preset_summaries():
        print(f"  {name:<18} {model:<32} {comment}")
    if args.presets_only:
        return 0
    from trainer.models import registered_families

    print("families with a dedicated adapter (model_type -> adapter):")
    for model_type, adapter in sorted(registered_families().items()):
        print(f"  {model_type:<18} {adapter.name}")
    print("  any other transformers MoE whose experts use the experts interface gets the generic fast path;")
    print("  everything else loads as the plain transformers model")
    return 0
