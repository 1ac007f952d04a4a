"""`MoEAutoModelForCausalLM`: load any HF v5 causal LM, with the fast MoE path swapped in where one exists.

The returned object is the transformers `PreTrainedModel` itself (same class, same parameter names), so
`save_pretrained` writes a standard HF checkpoint and every HF utility keeps working. What changes:
- experts run through the `moe_fast` experts implementation (grouped GEMM, sort-once permutation, dispatchers);
- routers of families with an adapter run the fused router (same outputs, fp32 scoring);
- `parallel=ParallelConfig(...)` under torchrun returns the model sharded with FSDP2 + expert parallelism.
Models that are not MoE, or whose experts do not use the transformers experts interface, load as plain HF models
with a one-line notice.
"""

from __future__ import annotations

import copy
import logging
import os
import re

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from trainer.errors import UserError
from trainer.models.base import FamilyAdapter, num_experts
from trainer.models.families import generic_adapter
from trainer.models.registry import adapter_for
from trainer.moe.experts import register_fast_experts

logger = logging.getLogger("trainer.models")


def _model_class(config: PretrainedConfig):
    mapping = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return mapping[type(config)]
    except KeyError:
        return None


def resolve_adapter(config: PretrainedConfig) -> FamilyAdapter | None:
    """The adapter for this config, or None when it should load as a plain HF model (the reason is logged)."""
    model_type = getattr(config, "model_type", None)
    adapter = adapter_for(model_type)
    if adapter is not None:
        adapter.validate(config)
        return adapter
    model_class = _model_class(config)
    if num_experts(config) is None:
        _notice(f"{model_type} is not a Mixture-of-Experts model: loading the plain transformers model")
        return None
    if model_class is None or not model_class._can_set_experts_implementation():  # noqa: SLF001
        _notice(f"{model_type} has no fast MoE path (its experts do not use the transformers experts interface): "
                "loading the plain transformers model")
        return None
    adapter = generic_adapter(model_type)
    adapter.validate(config)
    return adapter


def _notice(message: str) -> None:
    logger.warning(message)
    print(f"notice: {message}")


def _load_config(name_or_path: str, hf_kwargs: dict) -> PretrainedConfig:
    is_hub_id = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name_or_path) is not None and not name_or_path.startswith(".")
    if not is_hub_id and not os.path.exists(os.path.expanduser(name_or_path)):
        raise UserError(f"model path {name_or_path} does not exist", "set model.name_or_path to a checkpoint directory or a hub id")
    try:
        return AutoConfig.from_pretrained(
            name_or_path,
            trust_remote_code=hf_kwargs.get("trust_remote_code", False),
            **{k: hf_kwargs[k] for k in ("revision", "token", "cache_dir") if k in hf_kwargs},
        )
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"cannot read the model config from {name_or_path}: {first_line}",
            "pass a local checkpoint directory with config.json, or a hub id reachable from this machine "
            "(set model.trust_remote_code=true only for repositories you trust)",
        ) from err


class MoEAutoModelForCausalLM:
    """Factory with the `AutoModelForCausalLM` API that returns HF models with fast MoE layers."""

    @classmethod
    def from_config(cls, config: PretrainedConfig, *, fast: bool = True, **hf_kwargs) -> PreTrainedModel:
        """Random-init model from a config. hf_kwargs go to transformers (`dtype`, `attn_implementation`, ...)."""
        config = copy.deepcopy(config)  # HF writes the experts implementation into the config object
        adapter = resolve_adapter(config) if fast else None
        if adapter is None:
            return AutoModelForCausalLM.from_config(config, **hf_kwargs)
        model = AutoModelForCausalLM.from_config(config, experts_implementation=register_fast_experts(), **hf_kwargs)
        return _finish(model, adapter)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, *, parallel=None, fast: bool = True, **hf_kwargs
    ) -> PreTrainedModel:
        """Load a HF checkpoint (hub id or directory). `parallel`: a `trainer.parallel.ParallelConfig` to shard."""
        config = _load_config(str(name_or_path), hf_kwargs)
        adapter = resolve_adapter(config) if fast else None
        if parallel is not None and _world_size() > 1:
            from trainer.parallel.load import load_parallel  # FSDP2 + EP; meta-device init, rank-local reads

            return load_parallel(str(name_or_path), config, adapter, parallel, **hf_kwargs)
        if adapter is None:
            return AutoModelForCausalLM.from_pretrained(name_or_path, **hf_kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, experts_implementation=register_fast_experts(), **hf_kwargs
        )
        return _finish(model, adapter)


def _finish(model: PreTrainedModel, adapter: FamilyAdapter) -> PreTrainedModel:
    adapter.patch(model)
    model.moe_adapter = adapter
    return model


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
