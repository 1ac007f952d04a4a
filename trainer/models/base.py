"""The adapter seam: what a model family tells the stack about itself.

An adapter never re-implements a HF model. It says which router modules to fuse (and with which `RouterSpec`),
which key table maps its checkpoints, and how to check a config before anything is built. A family with special
layers (Nemotron-H's Mamba2 mixer) overrides `patch` to swap those in as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.checkpoint.key_tables import KeyTable
from trainer.errors import UserError
from trainer.moe.fused_router import install_fused_router
from trainer.moe.router import RouterSpec


@dataclass(frozen=True)
class FamilyAdapter:
    """Base adapter: experts through the `moe_fast` implementation, optional fused routers."""

    name: str
    model_types: tuple[str, ...]
    key_table: KeyTable | None
    router_class_names: tuple[str, ...] = ()

    def router_spec(self, config) -> RouterSpec | None:
        """The family's routing rule, or None to keep HF's router forward."""
        return None

    def validate(self, config) -> None:
        """Raise UserError for configs this family cannot build (before any weights are touched)."""
        num_experts = _num_experts(config)
        config = text_config(config)
        top_k = getattr(config, "num_experts_per_tok", None)
        if num_experts is not None and top_k is not None and not 0 < top_k <= num_experts:
            raise UserError(
                f"config num_experts_per_tok={top_k} must be between 1 and the number of experts ({num_experts})",
                "fix num_experts_per_tok in config.json",
            )
        n_group = getattr(config, "n_group", None) or 1
        if num_experts is not None and n_group > 1:
            topk_group = getattr(config, "topk_group", None) or 1
            if num_experts % n_group or not 0 < topk_group <= n_group:
                raise UserError(
                    f"config n_group={n_group} / topk_group={topk_group} do not fit {num_experts} experts",
                    "n_group must divide the number of experts and topk_group must be between 1 and n_group",
                )

    def router_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        return [m for m in model.modules() if type(m).__name__ in self.router_class_names]

    def patch(self, model: torch.nn.Module) -> None:
        """Swap in the fast pieces that the experts interface does not cover (routers here)."""
        pin_checkpoint_conversions(model)
        spec = self.router_spec(model.config)
        if spec is None:
            return
        for router in self.router_modules(model):
            install_fused_router(router, spec)


def pin_checkpoint_conversions(model: torch.nn.Module) -> None:
    """Record transformers' own load/save key conversions on the model while it still has its transformers class.

    transformers derives them from the model class when the model was not loaded by `from_pretrained`; FSDP2 swaps
    the class for one defined outside transformers, which transformers then treats as custom code and skips, so an
    export from a sharded model would lose root-level renames (Nemotron-H's `model.` -> `backbone.`).
    """
    if getattr(model, "_weight_conversions", None) is not None:
        return  # loaded by from_pretrained: transformers recorded what it applied
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    conversions = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    model._weight_conversions = conversions or None


def text_config(config):
    """The language model's config: `config` itself, or the `text_config` of a multimodal config (Qwen3.5-MoE,
    Llama 4), where the MoE fields live."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if get_text_config is not None else config


def _num_experts(config) -> int | None:
    config = text_config(config)
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def num_experts(config) -> int | None:
    """Number of routed experts from any family's config field name, or None for dense models."""
    return _num_experts(config)
