"""The full (unsharded) tensors of a LoRA model, for what a LoRA run writes outside DCP: the frozen base of a
random-init run (`hf/lora-base.safetensors`), the adapter directory and the merged export.

With one process these are the live tensors. Under FSDP2 every parameter is a DTensor sharded over the data-parallel
ranks; `gathered_state` all-gathers each one (a collective: every rank calls it) and only rank 0 keeps the result,
in host memory (`full_state_dict`, `cpu_offload`), so rank 0 writes exactly what a single process would.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_writer() -> bool:
    """Whether this rank writes the gathered files (rank 0, or the only process)."""
    return not is_distributed() or dist.get_rank() == 0


def gathered_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{state-dict name: full tensor} on the writing rank, {} on the others. Collective under several processes."""
    if not is_distributed():
        return {name: tensor.detach() for name, tensor in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if is_writer() else {}
