"""Model loading with fast MoE layers: `MoEAutoModelForCausalLM` and the family adapters."""

from trainer.models.auto import MoEAutoModelForCausalLM, resolve_adapter
from trainer.models.base import FamilyAdapter
from trainer.models.registry import adapter_for, register_adapter, registered_families

__all__ = [
    "FamilyAdapter",
    "MoEAutoModelForCausalLM",
    "adapter_for",
    "register_adapter",
    "registered_families",
    "resolve_adapter",
]
