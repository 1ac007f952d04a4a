"""What a LoRA run exports: the adapter in PEFT's format, and the merged model's state dict.

Adapter directory (what `peft.PeftModel.from_pretrained(plain_transformers_model, dir)` loads):
    adapter_config.json         `peft.LoraConfig.save_pretrained` (r, lora_alpha, target_modules, target_parameters)
    adapter_model.safetensors   PEFT's keys: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (no adapter
                                name), fused experts' [E*r, in] / [out, r*E] as PEFT lays them out
Merged state dict: every adapted base weight plus PEFT's own delta (`get_delta_weight`: scaling * B A, per expert for
fused parameters), under the plain model's names (no `base_layer`), so `save_pretrained` writes a standard HF
checkpoint. The live base weights are only read: the merged tensors are new ones.

Every function takes the model's full tensors as `state` (`trainer.lora.gather.gathered_state`: the live tensors
with one process, the all-gathered ones on rank 0 under FSDP2), so a sharded run writes what a single process does.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch

from trainer.checkpoint.durable import replace_dir
from trainer.errors import UserError
from trainer.lora.experts import ADAPTER
from trainer.lora.inject import lora_config_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before the model's own names


def adapter_dir_for(export_dir: str | Path) -> Path:
    """The adapter's directory beside a merged export: `export/` -> `export-adapter/`."""
    export_dir = Path(export_dir)
    return export_dir.with_name(f"{export_dir.name}-adapter")


def check_adapter_target(out_dir: str | Path, overwrite: bool) -> None:
    """UserError unless `out_dir` is empty, new, or (with overwrite) an earlier adapter export."""
    from trainer.checkpoint.export import check_replaceable

    check_replaceable(Path(out_dir), overwrite, ADAPTER_CONFIG, "adapter", "a PEFT adapter")


def _live_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach() for name, tensor in model.state_dict().items()}


def adapter_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
                       ) -> dict[str, torch.Tensor]:
    """PEFT's adapter state dict of `model` (from its full tensors `state`; default: the live ones), with the keys
    PEFT writes to disk."""
    from peft import get_peft_model_state_dict

    full = _live_state(model) if state is None else state
    adapter = get_peft_model_state_dict(model, state_dict=full, adapter_name=ADAPTER)
    return {PEFT_PREFIX + key: value.detach().contiguous() for key, value in adapter.items()}


def save_adapter(model: torch.nn.Module, out_dir: str | Path, dtype: torch.dtype, overwrite: bool = False,
                 base_model: str | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter directory (assembled beside it, swapped into place) from the model's full tensors `state`
    (default: the live ones). Returns `out_dir`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    check_adapter_target(out, overwrite)
    config = lora_config_of(model)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in adapter_state_dict(model, state).items()}
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config.base_model_name_or_path = base_model
        config.save_pretrained(str(tmp))
        replace_dir(tmp, out)
    except OSError as err:
        raise UserError(f"cannot write the adapter to {out} ({err.strerror or type(err).__name__})",
                        "free some space or make the directory writable") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _plain_name(name: str) -> str:
    """`mlp.experts.base_layer.base_layer.gate_up_proj` -> `mlp.experts.gate_up_proj` (PEFT's wrappers removed)."""
    return name.replace(".base_layer", "")


def base_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The frozen base model's state dict under the plain model's names (from the full tensors `state`; default:
    the live tensors, not copies)."""
    full = _live_state(model) if state is None else state
    return {_plain_name(k): v for k, v in full.items() if ".lora_" not in k}


@contextlib.contextmanager
def _factors_from(module: torch.nn.Module, a: torch.Tensor, b: torch.Tensor):
    """PEFT's layer `module` with its lora_A / lora_B weights temporarily replaced by the full tensors `a`, `b`
    (under FSDP2 the live ones are shards), so PEFT's own `get_delta_weight` computes the merge."""
    layers = module.lora_A[ADAPTER], module.lora_B[ADAPTER]
    saved = [layer._parameters["weight"] for layer in layers]  # noqa: SLF001
    try:
        for layer, full in zip(layers, (a, b)):
            layer._parameters["weight"] = full  # noqa: SLF001
        yield
    finally:
        for layer, live in zip(layers, saved):
            layer._parameters["weight"] = live  # noqa: SLF001


def merged_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter merged in (new tensors for the adapted weights), from the
    model's full tensors `state` (default: the live ones)."""
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    full = _live_state(model) if state is None else state
    merged = base_state_dict(model, full)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or ADAPTER not in module.lora_A:
                continue
            leaf = module.parameter_name if isinstance(module, ParamWrapper) else "weight"
            key = f"{_plain_name(name)}.{leaf}"
            base = merged[key]
            a, b = full[f"{name}.lora_A.{ADAPTER}.weight"], full[f"{name}.lora_B.{ADAPTER}.weight"]
            with _factors_from(module, a.to(base.device), b.to(base.device)):
                delta = module.get_delta_weight(ADAPTER)
            merged[key] = base + delta.to(base.device, base.dtype)
    return merged
