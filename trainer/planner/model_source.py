"""Find a model's config without downloading weights: shipped configs, a local dir / config.json, or the HF cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.errors import UserError

SHIPPED_DIR = Path(__file__).parent / "model_configs"

# Hub ids (and short names) whose public config.json ships with the planner, so `moe plan` works offline.
SHIPPED = {
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b.json",
    "qwen/qwen3-30b-a3b-base": "qwen3-30b-a3b.json",
    "qwen3-30b-a3b": "qwen3-30b-a3b.json",
    "nvidia/nvidia-nemotron-3-nano-30b-a3b-bf16": "nemotron-3-nano-30b-a3b.json",
    "nvidia/nvidia-nemotron-3-nano-30b-a3b-base-bf16": "nemotron-3-nano-30b-a3b.json",
    "nemotron-3-nano-30b-a3b": "nemotron-3-nano-30b-a3b.json",
    "nemotron-3-nano": "nemotron-3-nano-30b-a3b.json",
    "deepseek-ai/deepseek-v3": "deepseek-v3.json",
    "deepseek-v3": "deepseek-v3.json",
    "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b.json",
    "mistralai/mixtral-8x7b-instruct-v0.1": "mixtral-8x7b.json",
    "mixtral-8x7b": "mixtral-8x7b.json",
}


def load_model_config(name_or_path: str, overrides: dict | None = None) -> dict:
    """config.json contents (a dict) for a hub id, short name, local dir or file, with `overrides` applied.

    Overrides are HF config fields (e.g. {"num_hidden_layers": 12}); for Nemotron-H a shorter layer pattern can
    be given as `hybrid_override_pattern` or `layers_block_type`.
    """
    config = _find(name_or_path)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    for key, value in (overrides or {}).items():
        config[key] = value
    if config.get("model_type") == "nemotron_h" and overrides:
        # The pattern wins over the layer count, as in transformers; keep the two consistent when one is overridden.
        if "num_hidden_layers" in overrides and not {"hybrid_override_pattern", "layers_block_type"} & set(overrides):
            _truncate_nemotron(config, int(overrides["num_hidden_layers"]))
        elif {"hybrid_override_pattern", "layers_block_type"} & set(overrides):
            config.pop("layers_block_type" if "hybrid_override_pattern" in overrides else "hybrid_override_pattern", None)
    return config


def _truncate_nemotron(config: dict, layers: int) -> None:
    if config.get("layers_block_type"):
        config["layers_block_type"] = list(config["layers_block_type"])[:layers]
    if config.get("hybrid_override_pattern"):
        config["hybrid_override_pattern"] = config["hybrid_override_pattern"][:layers]


def _find(name_or_path: str) -> dict[str, Any]:
    from trainer.config import resolve_path  # builtin:<asset> paths

    path = Path(resolve_path(name_or_path) or "")
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if path.is_file() and path.suffix == ".json":
        return json.loads(path.read_text())
    shipped = SHIPPED.get(name_or_path.lower().rstrip("/"))
    if shipped:
        return json.loads((SHIPPED_DIR / shipped).read_text())
    try:  # a config already in the local HF cache; never downloads
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name_or_path, local_files_only=True).to_dict()
    except Exception:  # noqa: BLE001 - any failure means: not available offline
        pass
    raise UserError(
        f"no config found for model '{name_or_path}' (not a local dir, not shipped, not in the HF cache)",
        f"pass a local dir or config.json, or one of: {', '.join(sorted(k for k in SHIPPED if '/' in k))}",
    )
