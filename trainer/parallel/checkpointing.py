"""Activation checkpointing: one vocabulary for the trainer, the planner and the recipe
(`parallel.activation_checkpointing`).

    none       keep every activation to the backward
    full       recompute every decoder layer in the backward (transformers' own, non-reentrant); only its input stays
    attention  recompute the attention sub-block of each layer (projections + attention kernel): cheap to recompute
               per byte saved, and it holds no router state, so the aux-loss bookkeeping is untouched
    moe        recompute the MoE sub-block (router, experts, shared experts) of each layer

    apply_checkpointing(model, "attention")   # in place, before torch.compile; returns a note
"""

from __future__ import annotations

import torch

MODES = ("none", "full", "attention", "moe")
_ATTENTION_BLOCKS = ("attention", "full_attention")  # Nemotron-H block types of its attention layers


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks (HF `_no_split_modules` classes) in model order."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
        layers = list(getattr(base, "layers", []))
    return layers


def sub_blocks(layer: torch.nn.Module, which: str) -> list[torch.nn.Module]:
    """The attention ("attention") or MoE/MLP ("moe") sub-modules of one decoder layer, for Llama-style and
    Nemotron-H-style blocks (a Nemotron-H layer has one `mixer`, of the kind its `block_type` names)."""
    if which == "attention":
        found = [getattr(layer, n) for n in ("self_attn", "attention") if hasattr(layer, n)]
    else:
        found = [getattr(layer, n) for n in ("mlp", "block_sparse_moe", "feed_forward") if hasattr(layer, n)]
    mixer = getattr(layer, "mixer", None)
    if mixer is not None:
        # exact names: Nemotron-H's Mamba2 layers are "linear_attention" (formerly "mamba"), never recomputed here
        kind = str(getattr(layer, "block_type", ""))
        if kind in (_ATTENTION_BLOCKS if which == "attention" else ("moe",)):
            found.append(mixer)
    return found


def _checkpointed(forward):
    from torch.utils.checkpoint import checkpoint

    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return wrapper


def apply_checkpointing(model: torch.nn.Module, mode: str) -> str | None:
    """Turn on `mode` (one of MODES) in place; returns a note (None for "none")."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing {mode!r}: choose one of {'|'.join(MODES)}")
    if mode == "none":
        return None
    if mode == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return "activation checkpointing: every decoder layer"
    count = 0
    for layer in decoder_layers(model):
        for sub in sub_blocks(layer, mode):
            sub.forward = _checkpointed(sub.forward)
            count += 1
    return f"activation checkpointing: {count} {mode} sub-blocks"
