"""How many adapter parameters a recipe's `lora` section adds to a model, from its config alone (for the planner).

The model is built on the meta device (no memory, well under a second for a 30B MoE), the targets are resolved as
for training (`trainer.lora.targets`), and each matched weight counts what PEFT gives it: r * (in + out) for a linear
layer, E * r * (in + out) for a fused expert parameter (A [E*r, in], B [out, r*E]).
"""

from __future__ import annotations

import torch

from trainer.lora.targets import resolve_targets


def _matches(name: str, suffixes: list[str]) -> bool:
    return any(name == s or name.endswith(f".{s}") for s in suffixes)


def _meta_model(config):
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config, dict):
        values = dict(config)
        values.pop("architectures", None)
        config = AutoConfig.for_model(values.pop("model_type"), **values)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def adapter_params(config, lora_cfg) -> int:
    """Adapter parameters of `lora_cfg` (rank, targets) on the model of `config` (HF config object or dict)."""
    model = _meta_model(config)
    modules, parameters = resolve_targets(model, list(lora_cfg.targets))
    rank, total = int(lora_cfg.rank), 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and _matches(name, modules):
            total += rank * (module.in_features + module.out_features)
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() == 3 and _matches(f"{name}.{param_name}", parameters):
                experts, rows, cols = param.shape
                total += experts * rank * (rows + cols)
    return total
