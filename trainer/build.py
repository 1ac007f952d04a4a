"""Build the tokenizer and the model a recipe names, through `MoEAutoModelForCausalLM` (fast MoE layers)."""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer

from trainer.checkpoint.model_files import check_weight_files
from trainer.config import ModelConfig, PerfConfig, resolve_path
from trainer.errors import UserError
from trainer.models import MoEAutoModelForCausalLM
from trainer.models.config_overrides import apply_config_overrides
from trainer.perf import PerfOptions


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


def attn_implementation(cfg: ModelConfig) -> str | None:
    """model.attn_implementation for transformers: `auto` is None, which makes transformers pick sdpa where the
    model supports it and eager otherwise (GPT-OSS's attention sinks have no sdpa path)."""
    return None if cfg.attn_implementation == "auto" else cfg.attn_implementation


def build_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, parallel=None):
    """Random init (model.from_config) or pretrained weights, in `dtype`, on `device`, in train mode.

    `parallel` (a ParallelConfig) is handed to the loader under torchrun so it can build the model sharded. A
    damaged or mismatched model directory is a UserError before (or instead of) a traceback from the loader.
    """
    hf_kwargs = {"dtype": dtype, "attn_implementation": attn_implementation(cfg)}
    path = resolve_path(cfg.name_or_path)
    try:
        if cfg.from_config:
            config = load_model_config(cfg)
            model = MoEAutoModelForCausalLM.from_config(config, **hf_kwargs)
        else:
            if cfg.config_overrides:
                hf_kwargs["config"] = load_model_config(cfg)
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


def perf_options(cfg: PerfConfig, device: torch.device, has_mamba: bool = False, world_size: int = 1) -> PerfOptions:
    """The recipe's `perf` section resolved for `device` (auto: what pays there, docs/BENCHMARKS.md).

    `compile: auto` is on for single-process CUDA runs of models without Mamba2 layers: measured on the Qwen3-MoE
    shapes (+11-17% on one GPU), and there a failed compile falls back to eager. Several processes (measured +7.5% on
    two GPUs, torch 2.11) and hybrids (not measured around the Mamba kernels) compile only with `on`."""
    cuda = device.type == "cuda"

    def enabled(value: str, auto: bool) -> bool:
        return value == "on" or (value == "auto" and auto)

    return PerfOptions(
        loss="fused" if enabled(cfg.fused_ce, True) else "hf",
        fused_experts=enabled(cfg.fused_experts, cuda),
        kernels="liger" if cfg.kernels == "liger" or (cfg.kernels == "auto" and cuda) else "eager",
        optimizer={"auto": "fused" if cuda else "foreach"}.get(cfg.optimizer, cfg.optimizer),
        compile="layers" if enabled(cfg.compile, cuda and not has_mamba and world_size == 1) else "none",
    )

