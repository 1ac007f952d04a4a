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
from trainer.quiet import quiet_transformers

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
        cls, name_or_path: str, *, parallel=None, fast: bool = True, strict: bool = False, **hf_kwargs
    ) -> PreTrainedModel:
        """Load a HF checkpoint (hub id or directory). `parallel`: a `trainer.parallel.ParallelConfig` to shard.

        strict: a tensor the model needs but the checkpoint lacks, or one of another shape, is a UserError (what
        training wants). transformers' default, kept when strict is false, initialises such tensors at random with
        a warning, which suits loading a backbone under a new head but trains garbage from a damaged checkpoint.
        """
        config = hf_kwargs.get("config") or _load_config(str(name_or_path), hf_kwargs)  # the caller's edits win
        adapter = resolve_adapter(config) if fast else None
        if parallel is not None and _world_size() > 1:
            from trainer.parallel.load import load_parallel  # FSDP2 + EP; meta-device init, rank-local reads

            return load_parallel(str(name_or_path), config, adapter, parallel, **hf_kwargs)
        if adapter is not None:
            hf_kwargs["experts_implementation"] = register_fast_experts()
        if not strict:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, **hf_kwargs)
        else:
            with quiet_transformers():  # its load report would print the same facts as a table before our line
                model, info = AutoModelForCausalLM.from_pretrained(
                    name_or_path, output_loading_info=True, ignore_mismatched_sizes=True, **hf_kwargs)
            _check_loading_info(str(name_or_path), info)
        return model if adapter is None else _finish(model, adapter)


def _check_loading_info(name_or_path: str, info: dict) -> None:
    """UserError for tensors transformers had to leave at their random init (missing, or of another shape)."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda item: item[0])  # a set of (key, disk, model)
    if mismatched:
        key, on_disk, in_model = mismatched[0]
        raise UserError(f"model {name_or_path} does not match its config: {key} is {tuple(on_disk)} in the weights "
                        f"but {tuple(in_model)} in the model the config describes"
                        f"{f' (+{len(mismatched) - 1} more)' if len(mismatched) > 1 else ''}",
                        "use the config.json that came with the weights (and no model.config_overrides that "
                        "change shapes)")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
        raise UserError(f"model {name_or_path} lacks {len(missing)} tensor(s) the model needs: {shown}",
                        "download the checkpoint again (a shard may be incomplete), or check that it is of this "
                        "model family")


def _finish(model: PreTrainedModel, adapter: FamilyAdapter) -> PreTrainedModel:
    adapter.patch(model)
    model.moe_adapter = adapter
    return model


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))
