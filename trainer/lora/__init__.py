"""LoRA for MoE models, in PEFT's own modules and format (docs/LORA.md).

- `targets`: the recipe's `lora.targets` (groups or module names) -> PEFT's `target_modules` / `target_parameters`;
- `inject`: `apply_lora(model, cfg)`: PEFT's layers injected into the model in place, base weights frozen, the
  routed experts switched to the grouped-GEMM adapter path (`experts`);
- `experts`: the adapter on the permuted rows of the grouped expert MLP (rows @ A_e then @ B_e, grouped GEMMs);
- `export`: the adapter directory (adapter_config.json + adapter_model.safetensors, loadable by
  `peft.PeftModel.from_pretrained`) and the merged state dict (base + scaling * B A) for a plain HF export;
- `gather`: the full tensors those files are written from (all-gathered to rank 0 under FSDP2);
- `fsdp`: what sharding a LoRA model needs (adapters in their layer's FSDP2 group; the dtype rule of this torch).
"""

from trainer.lora.inject import apply_lora, is_lora_model

__all__ = ["apply_lora", "is_lora_model"]
