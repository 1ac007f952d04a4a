"""`model.config_overrides`: edit a HF config the way config.json would, with every bad value a one-line UserError.

Setting attributes one by one on a loaded config goes wrong three ways: a derived property (Nemotron-H's
`hybrid_override_pattern`, computed from `layers_block_type`) has no setter and raises AttributeError; a derived
field's setter may ignore the value (Nemotron-H's `num_hidden_layers`), so the override silently does nothing; and a
value of the wrong type or range only fails deep inside the model's constructor, with a traceback. So the overrides
are merged into the config's dict and the config is built again by its own class (its `__post_init__` turns legacy
and derived fields into stored ones, its strict fields check types), each override is read back, and the model is
built once on the meta device (no memory), where values that only break a layer fail.
"""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from trainer.errors import UserError


def _nemotron_h(values: dict, overrides: dict) -> None:
    """Nemotron-H stores the layer list; the pattern string and the layer count are derived from it."""
    if "hybrid_override_pattern" in overrides or "layers_block_type" in overrides or "layer_types" in overrides:
        if "hybrid_override_pattern" in overrides:
            values.pop("layers_block_type", None)  # the pattern is only read when no list is given
            values.pop("layer_types", None)
    elif "num_hidden_layers" in overrides:
        layers = overrides["num_hidden_layers"]
        if isinstance(layers, int) and 0 < layers <= len(values.get("layers_block_type") or []):
            values["layers_block_type"] = list(values["layers_block_type"])[:layers]  # the first N layers


DERIVED_FIELDS = {"nemotron_h": _nemotron_h}  # model_type -> how its derived fields map onto stored ones


def apply_config_overrides(config: PretrainedConfig, overrides: dict) -> PretrainedConfig:
    """A new config: `config` with `overrides` applied and checked (see the module docstring)."""
    if not overrides:
        return config
    name = type(config).__name__
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise UserError(f"model.config_overrides.{key}: {name} has no such field", "remove it")
        current = getattr(config, key)
        if isinstance(current, int) and not isinstance(current, bool) and current > 0 and \
                isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise UserError(f"model.config_overrides.{key}={value} must be positive (the config has {current})",
                            f"set model.config_overrides.{key} to a positive value or remove it")
    values = copy.deepcopy(config.to_dict())
    values.update(copy.deepcopy(overrides))
    hook = DERIVED_FIELDS.get(getattr(config, "model_type", ""))
    if hook is not None:
        hook(values, overrides)
    try:
        edited = type(config).from_dict(values)
    except Exception as err:  # strict-dataclass validation, __post_init__ checks: any of them is a bad value
        raise UserError(f"model.config_overrides {overrides} do not make a valid {name} ({_describe(err)})",
                        "fix or remove them") from None
    for key, value in overrides.items():
        if not _same(getattr(edited, key, None), value):
            raise UserError(f"model.config_overrides.{key}={value!r} has no effect on {name} (it is derived from "
                            f"other fields and stays {getattr(edited, key, None)!r})",
                            "override the field it is derived from instead")
    _check_buildable(edited, overrides)
    return edited


def _check_buildable(config: PretrainedConfig, overrides: dict) -> None:
    """Build the model on the meta device: no memory, but every layer's constructor sees the new values."""
    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(copy.deepcopy(config))
    except Exception as err:
        raise UserError(f"model.config_overrides {overrides} give a config {type(config).__name__} cannot build a "
                        f"model from ({_describe(err)})", "fix or remove them") from None


def _same(actual, wanted) -> bool:
    if isinstance(actual, (list, tuple)) and isinstance(wanted, (list, tuple)):
        return list(actual) == list(wanted)
    return actual == wanted


def _describe(err: Exception) -> str:
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__
