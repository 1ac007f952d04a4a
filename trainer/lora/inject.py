"""`apply_lora(model, cfg)`: PEFT's LoRA layers injected into a built model, base frozen, experts on the row path.

The model stays the transformers model (no `PeftModel` around it), so the trainer, the optimizer (which takes the
parameters with requires_grad), checkpoints and the export see the same object. PEFT's layers give the adapter its
parameter names, its initialisation (A Kaiming-uniform, B zero: the adapted model starts as the base) and its
format. One change to PEFT's behaviour: a routed-experts module wrapped by `ParamWrapper`s does not get the dense
W + scaling * B A of every expert on each forward; the wrappers hand the call straight to the experts module, whose
`moe_fast` forward adds the adapter on the permuted rows (`trainer.lora.experts`). Models whose experts do not run
`moe_fast` (a plain transformers model) keep PEFT's own forward, which is the reference the tests compare with.
"""

from __future__ import annotations

import types

import torch

from trainer.errors import UserError
from trainer.lora import experts as lora_experts
from trainer.lora.targets import peft_config

ADAPTER = lora_experts.ADAPTER


def is_lora_model(model: torch.nn.Module) -> bool:
    """Whether `apply_lora` ran on this model (its checkpoints then hold the trainable state only)."""
    return model.__dict__.get("moe_lora_config") is not None


def lora_config_of(model: torch.nn.Module):
    """The `peft.LoraConfig` the model was adapted with (None for a full fine-tune)."""
    return model.__dict__.get("moe_lora_config")


def apply_lora(model: torch.nn.Module, cfg, config=None) -> torch.nn.Module:
    """Inject adapters per the recipe's `lora` section (or a ready `peft.LoraConfig` as `config`), in place.

    Afterwards only the adapter weights have requires_grad (in fp32 whatever the base dtype); every base parameter
    is frozen and untouched (the adapted forward reads it, nothing writes it). Returns the model.
    """
    try:
        from peft import inject_adapter_in_model
    except ImportError:
        raise UserError("lora.enabled=true needs PEFT, which is not installed",
                        "pip install 'moe-stack[lora]' (or pip install peft)") from None

    config = config if config is not None else peft_config(model, cfg)
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as err:  # PEFT's refusals (a module it cannot adapt on this family, ...)
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"PEFT cannot adapt lora.targets={list(cfg.targets) if cfg else config.target_modules} on "
                        f"this model: {first_line[:240]}", "drop that module from lora.targets") from None
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
        if ".lora_" in name and param.is_floating_point() and param.element_size() < 4:
            param.data = param.data.float()  # the adapters train in fp32 beside a bf16 base (a few MB of state)
    _route_experts_to_rows(model)
    model.__dict__["moe_lora_config"] = config
    return model


def _is_param_wrapper(module: torch.nn.Module) -> bool:
    from peft.tuners.lora.layer import ParamWrapper

    return isinstance(module, ParamWrapper)


def _route_experts_to_rows(model: torch.nn.Module) -> None:
    """Each outermost ParamWrapper of a `moe_fast` experts module calls the experts module directly; the experts
    module gets the wrappers' adapters (`trainer.lora.experts.attach`)."""
    from trainer.moe.experts import IMPLEMENTATION_NAME

    inner = set()
    for module in model.modules():
        if _is_param_wrapper(module) and _is_param_wrapper(module.base_layer):
            inner.add(id(module.base_layer))
    for module in model.modules():
        if not _is_param_wrapper(module) or id(module) in inner:
            continue
        wrappers, base = [], module
        while _is_param_wrapper(base):
            wrappers.append(base)
            base = base.base_layer
        if getattr(getattr(base, "config", None), "_experts_implementation", None) != IMPLEMENTATION_NAME:
            continue  # not our experts forward: PEFT's dense path stays
        lora_experts.attach(base, wrappers)
        module.forward = types.MethodType(_call_experts, module)
        module.__dict__["moe_lora_experts"] = base


def _call_experts(self, hidden_states, *args, **kwargs):
    """Replacement forward of an outermost expert ParamWrapper: the experts module itself (adapters on its rows)."""
    return self.__dict__["moe_lora_experts"](hidden_states, *args, **kwargs)
