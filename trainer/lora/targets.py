"""The recipe's `lora.targets` -> PEFT's `target_modules` (linear layers) and `target_parameters` (fused experts).

Groups, found by looking at the model (so one recipe works for every family):
- `attention`: the linear layers of attention modules (`q_proj`, `k_proj`, `v_proj`, `o_proj`; DeepSeek-V3's MLA
  projections), named `<attention module>.<linear>` so a dense MLP's layers never match;
- `experts`: the routed experts' 3-D parameters (`gate_up_proj` or `up_proj`, and `down_proj`), which PEFT adapts
  with `target_parameters` (one [E*r, in] A and one [out, r*E] B per parameter);
- `shared_experts`: the linear layers of a shared expert (`shared_expert` / `shared_experts`);
- `mamba`: the Mamba2 mixers' `in_proj`. Not `out_proj`: PEFT refuses it on Mamba models (the fused scan kernel
  reads the output projection's weight directly, so an adapter there would be skipped), and an adapter PEFT cannot
  load is no use.
Anything else is a module-name suffix handed to PEFT as is (`mlp.gate_proj`, `lm_head`, ...). Names are suffixes
(`a.b` matches every module whose name ends in `.a.b`), so adapter_config.json stays short for any depth.
"""

from __future__ import annotations

import torch

from trainer.errors import UserError

GROUPS = ("attention", "experts", "shared_experts", "mamba")
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts")
MAMBA_LINEARS = ("in_proj",)
EXPERT_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")


def check_recipe_targets(targets: list[str]) -> None:
    """UserError for an empty list or an empty entry (the names themselves are checked against the model)."""
    if not targets or any(not str(t).strip() for t in targets):
        raise UserError(f"lora.targets must name at least one group or module, got {targets}",
                        f"write e.g. lora.targets=[attention,experts] (groups: {', '.join(GROUPS)})")


def _is_attention(module: torch.nn.Module) -> bool:
    return "Attention" in type(module).__name__


def _is_routed_experts(module: torch.nn.Module) -> bool:
    return getattr(module, "num_experts", None) is not None and getattr(module, "down_proj", None) is not None \
        and isinstance(module.down_proj, torch.nn.Parameter) and module.down_proj.dim() == 3


def _is_mamba(module: torch.nn.Module) -> bool:
    return "Mamba" in type(module).__name__ and "Mixer" in type(module).__name__


def _suffix(parent_name: str, child_name: str) -> str:
    """`model.layers.3.self_attn` + `q_proj` -> `self_attn.q_proj` (the parent's own name and the child)."""
    return f"{parent_name.rpartition('.')[2]}.{child_name}" if parent_name else child_name


def resolve_targets(model: torch.nn.Module, targets: list[str]) -> tuple[list[str], list[str]]:
    """-> (target_modules, target_parameters), sorted suffixes; UserError for a group or name that matches nothing."""
    modules: set[str] = set()
    parameters: set[str] = set()
    found = {target: False for target in targets}
    names = [name for name, _ in model.named_modules()]
    for parent_name, parent in model.named_modules():
        for child_name, child in parent.named_children():
            is_linear = isinstance(child, torch.nn.Linear)
            if "attention" in found and is_linear and _is_attention(parent):
                modules.add(_suffix(parent_name, child_name))
                found["attention"] = True
            if "shared_experts" in found and is_linear and parent_name.rpartition(".")[2] in SHARED_EXPERT_NAMES:
                modules.add(_suffix(parent_name, child_name))
                found["shared_experts"] = True
            if "mamba" in found and is_linear and _is_mamba(parent) and child_name in MAMBA_LINEARS:
                modules.add(_suffix(parent_name, child_name))
                found["mamba"] = True
        if "experts" in found and _is_routed_experts(parent):
            for param_name in EXPERT_PARAMETERS:
                if isinstance(getattr(parent, param_name, None), torch.nn.Parameter):
                    parameters.add(_suffix(parent_name, param_name))
            found["experts"] = True
    for target in targets:
        if target in GROUPS:
            continue
        found[target] = any(name == target or name.endswith(f".{target}") for name in names)
        modules.add(target)
    missing = [t for t, hit in found.items() if not hit]
    if missing:
        raise UserError(f"lora.targets {', '.join(missing)} match(es) no module of this model",
                        f"use the groups {', '.join(GROUPS)} or module names of the model (e.g. self_attn.q_proj)")
    return sorted(modules), sorted(parameters)


def peft_config(model: torch.nn.Module, cfg):
    """The `peft.LoraConfig` for the recipe's `lora` section on this model (what adapter_config.json records)."""
    from peft import LoraConfig

    target_modules, target_parameters = resolve_targets(model, list(cfg.targets))
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                      target_modules=target_modules or None, target_parameters=target_parameters or None,
                      task_type="CAUSAL_LM")
