"""Nemotron-H (Nemotron 3 Nano and friends): hybrid Mamba2 / attention / MoE / dense-MLP layers.

What the adapter swaps into transformers' own `NemotronHForCausalLM` (same parameters, same state dict):
- experts (`mixer.experts`, relu2, `up_proj [E, I, H]` / `down_proj [E, H, I]`, no gate) run through the
  `moe_fast` experts implementation; with `moe_latent_size` transformers projects tokens to the latent size around
  the experts (`fc1_latent_proj` / `fc2_latent_proj`), so the experts simply see [T, latent] rows;
- the router (`NemotronHTopkRouter`: sigmoid scores, `e_score_correction_bias` for the choice only, group-limited
  top-k, renormalisation, `routed_scaling_factor`) runs the fused router; `aux_free_balancer` can update the bias;
- the Mamba2 mixers run fused mamba-ssm / causal-conv1d kernels when installed, else a PyTorch reference, and
  packed samples never see each other (`trainer/models/mamba_mixer.py`);
- the config saves in the published format: `hybrid_override_pattern` (the string serving engines read) instead of
  transformers 5's `layers_block_type` list (see `PublishedFormatConfig`).
"""

from __future__ import annotations

import json

import torch
from transformers import NemotronHConfig as _TransformersNemotronHConfig

from trainer.checkpoint.key_tables import NEMOTRON_H as NEMOTRON_H_KEYS
from trainer.errors import UserError
from trainer.kernels import mamba as mamba_kernels
from trainer.models import mamba_mixer
from trainer.models.families import SigmoidGroupRouterAdapter
from trainer.moe.balance import AuxLossFreeBalancer

ROUTER_CLASS_NAME = "NemotronHTopkRouter"


class NemotronHConfig(_TransformersNemotronHConfig):
    """transformers' NemotronHConfig, written to config.json in the published checkpoint's format.

    transformers 5 writes the layer layout as `layers_block_type: [...]`; the published checkpoint, vLLM and the
    config classes of the transformers 4 era read `hybrid_override_pattern: "MEM*E..."` and define
    `layers_block_type` as a read-only property, so a config.json carrying the list fails to load there. This
    subclass writes the pattern (plus `num_hidden_layers`, and infinities as JSON `Infinity` like the published
    file) and leaves everything else to transformers; transformers 5 reads the pattern back to the same list.
    It keeps the class name on purpose: transformers' auto classes look configs up by class name.
    """

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(published_config_dict(self, use_diff=use_diff), indent=2, sort_keys=True) + "\n"


PublishedFormatConfig = NemotronHConfig


def published_config_dict(config: _TransformersNemotronHConfig, *, use_diff: bool = False) -> dict:
    """The config as the published checkpoint spells it: pattern strings, not transformers 5's layer lists."""
    base = _TransformersNemotronHConfig
    values = base.to_diff_dict(config) if use_diff else base.to_dict(config)
    values.pop("layers_block_type", None)
    values.pop("layer_types", None)
    values.pop("mtp_layers_block_type", None)
    values["hybrid_override_pattern"] = config.hybrid_override_pattern
    values["num_hidden_layers"] = config.num_hidden_layers
    if config.num_nextn_predict_layers:
        values["mtp_hybrid_override_pattern"] = config.mtp_hybrid_override_pattern
    return values


def keep_published_format(config: _TransformersNemotronHConfig) -> None:
    """Make `config` (and every model holding it) save config.json in the published format."""
    if type(config) is _TransformersNemotronHConfig:
        config.__class__ = NemotronHConfig


class NemotronHAdapter(SigmoidGroupRouterAdapter):
    """DeepSeek-V3-style router; relu2 experts; Mamba2 mixers with packed-sequence state resets."""

    def validate(self, config) -> None:
        super().validate(config)
        if config.mamba_num_heads % config.n_groups:
            raise UserError(
                f"config mamba_num_heads={config.mamba_num_heads} is not a multiple of n_groups={config.n_groups}",
                "fix mamba_num_heads / n_groups in config.json (each SSM group serves whole heads)",
            )
        intermediate = config.mamba_num_heads * config.mamba_head_dim
        if intermediate % config.n_groups:
            raise UserError(
                f"config mamba_num_heads * mamba_head_dim = {intermediate} is not divisible by "
                f"n_groups={config.n_groups}",
                "fix the Mamba2 sizes in config.json",
            )

    def patch(self, model: torch.nn.Module) -> None:
        super().patch(model)  # fused routers
        mamba_kernels.expose_to_transformers()  # generation keeps transformers' path: let it use the kernels too
        mamba_mixer.install(model)
        keep_published_format(model.config)


def aux_free_balancer(model: torch.nn.Module, rate: float, group=None) -> AuxLossFreeBalancer:
    """Aux-loss-free balancing on every Nemotron-H router (call `.step()` after each optimizer step)."""
    routers = [m for m in model.modules() if type(m).__name__ == ROUTER_CLASS_NAME]
    return AuxLossFreeBalancer(routers, rate, group)


NEMOTRON_H = NemotronHAdapter("nemotron_h", ("nemotron_h",), NEMOTRON_H_KEYS, (ROUTER_CLASS_NAME,))
