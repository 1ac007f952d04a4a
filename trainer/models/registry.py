"""Family adapters by model_type. Families register here; unknown MoE families fall back to the generic path."""

from __future__ import annotations

import importlib.util

from trainer.models.base import FamilyAdapter

_ADAPTERS: dict[str, FamilyAdapter] = {}


def register_adapter(adapter: FamilyAdapter) -> FamilyAdapter:
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter
    return adapter


def registered_families() -> dict[str, FamilyAdapter]:
    _load_builtin_families()
    return dict(_ADAPTERS)


def adapter_for(model_type: str) -> FamilyAdapter | None:
    """The dedicated adapter for a model_type, or None (the caller decides on the generic path)."""
    _load_builtin_families()
    return _ADAPTERS.get(model_type)


def _load_builtin_families() -> None:
    if _ADAPTERS:
        return
    from trainer.models import families

    for adapter in (families.QWEN3_MOE, families.MIXTRAL_ADAPTER, families.DEEPSEEK_V3):
        register_adapter(adapter)
    if importlib.util.find_spec("trainer.models.nemotron_h") is not None:  # its own module (Mamba2 kernels)
        from trainer.models import nemotron_h

        register_adapter(nemotron_h.NEMOTRON_H)
