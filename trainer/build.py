"""Build the tokenizer and the model a recipe names, through `MoEAutoModelForCausalLM` (fast MoE layers)."""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer

from trainer.checkpoint.model_files import check_weight_files
from trainer.config import ModelConfig, resolve_path
from trainer.errors import UserError
from trainer.models import MoEAutoModelForCausalLM
from trainer.models.config_overrides import apply_config_overrides


def load_tokenizer(cfg: ModelConfig):
    """The recipe's tokenizer (model.tokenizer, else model.name_or_path); it must have a pad or an EOS token."""
    path = resolve_path(cfg.tokenizer or cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load the tokenizer from {path}: {first_line}", "set model.tokenizer") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UserError(f"tokenizer {path} has neither a pad nor an EOS token", "use a tokenizer with an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(cfg: ModelConfig):
    """The HF config of the recipe's model, with model.config_overrides applied (and checked: see
    `trainer.models.config_overrides`)."""
    path = resolve_path(cfg.name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot read the model config from {path}: {first_line}", "set model.name_or_path") from None
    return apply_config_overrides(config, cfg.config_overrides)


def attention_implementation(cfg: ModelConfig, device: torch.device, packing: bool, config=None) -> str:
    """model.attn_implementation, with `auto` settled: flex attention on CUDA for packed data (a block mask per
    sample: the masked-out blocks are never computed, where sdpa would run a dense masked kernel), else sdpa; each
    only where the model class supports it (else the next one, eager last)."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    from transformers import AutoModelForCausalLM

    config = config if config is not None else load_model_config(cfg)
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)

    def supports(flag: str) -> bool:
        return model_class is None or bool(getattr(model_class, flag, False))

    if device.type == "cuda" and packing and supports("_supports_flex_attn"):
        return "flex_attention"
    return "sdpa" if supports("_supports_sdpa") else "eager"


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, parallel=None, packing: bool = False):
    """Random init (model.from_config) or pretrained weights, in `dtype`, on `device`, in train mode.

    `parallel` (a ParallelConfig) is handed to the loader under torchrun so it can build the model sharded;
    `packing` (data.packing) decides `model.attn_implementation: auto` (`attention_implementation`). A damaged or
    mismatched model directory is a UserError before (or instead of) a traceback from the loader.
    """
    path = resolve_path(cfg.name_or_path)
    try:
        config = load_model_config(cfg) if cfg.from_config or cfg.config_overrides else None
        hf_kwargs = {"dtype": dtype, "attn_implementation": attention_implementation(cfg, device, packing, config)}
        if cfg.from_config:
            with torch.device(device):  # random init where it trains: the device's generator, no host copy
                model = MoEAutoModelForCausalLM.from_config(config, **hf_kwargs)
        else:
            if cfg.config_overrides:
                hf_kwargs["config"] = config
            if os.path.isdir(path):
                check_weight_files(path)
            hf_kwargs["trust_remote_code"] = cfg.trust_remote_code
            hf_kwargs["use_safetensors"] = True  # weights are never unpickled: a .bin-only checkpoint is refused
            model = MoEAutoModelForCausalLM.from_pretrained(path, parallel=parallel, strict=True, **hf_kwargs)
    except (OSError, ValueError, SafetensorError) as err:  # what transformers raises for a model it cannot load
        raise UserError(f"cannot load the model {path}: {_first_sentence(err)}",
                        "check model.name_or_path and model.attn_implementation (auto picks one the model "
                        "supports)") from None
    if next(model.parameters()).device.type == "meta" or next(model.parameters()).device != device:
        model = model.to(device)
    return model.train()


def _first_sentence(err: Exception) -> str:
    """The gist of a library's error: its first line, cut after the first sentence (they run on with links)."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    end = line.find(". ", 40)
    return line[: end + 1] if end > 0 else line[:240]
