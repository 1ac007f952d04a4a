"""What each rank runs in tests/distributed/test_lora_fsdp.py: `moe train` with LoRA on the tiny Qwen3-MoE, sharded
by FSDP2 over the ranks (gloo, CPU, fp32)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from run_copies import copy_back_to_step_2

LORA = ["data.seq_len=64", "train.micro_batch_size=2", "optim.warmup_steps=1", "lora.enabled=true", "lora.rank=4",
        "optim.lr=3e-3", "train.max_steps=4", "checkpoint.every_steps=2"]


def lora_recipe(run_dir, *overrides):
    from trainer.config import load_recipe

    return load_recipe("tiny-moe", LORA + [f"output.dir={run_dir}", *overrides])


def train_resume_and_check_base(root: str) -> dict:
    """A straight 4-step run (checkpoints at 2 and 4, export), then a copy of it resumed from step 2; whether the
    base, gathered after training, equals the one saved at the start bit for bit."""
    from safetensors.torch import load_file

    from trainer.lora.export import base_state_dict
    from trainer.lora.gather import gathered_state
    from trainer.lora.run import BASE_WEIGHTS
    from trainer.train import train

    root = Path(root)
    straight = train(lora_recipe(root / "two"), progress=False)
    full = gathered_state(straight.model)
    base_unchanged = None
    if dist.get_rank() == 0:
        saved = load_file(str(root / "two" / "hf" / BASE_WEIGHTS))
        live = base_state_dict(straight.model, full)
        base_unchanged = sorted(saved) == sorted(live) and all(torch.equal(live[k], v) for k, v in saved.items())
    copy_back_to_step_2(root / "two", root / "resumed")
    resumed = train(lora_recipe(root / "resumed", "output.export=false"), progress=False)
    trainable = sorted(n for n, p in straight.model.named_parameters() if p.requires_grad)
    return {"losses": straight.losses, "resumed": resumed.losses, "base_unchanged": base_unchanged,
            "trainable": trainable, "sharded": all(hasattr(p, "device_mesh") for p in straight.model.parameters())}


def train_layouts(root: str, layouts: list[list[str]], resume_first_under: list[str] | None = None) -> list[dict]:
    """One LoRA run per layout (recipe overrides) in root/<index>; each run's losses and whether its experts' base
    weights were split by expert (DTensors on a mesh with the "ep" dim). With `resume_first_under`, a copy of the
    first run is resumed from its step 2 under those overrides (another layout) and its losses come last."""
    from trainer.train import train

    results = []
    for index, overrides in enumerate(layouts):
        result = train(lora_recipe(Path(root) / str(index), *overrides), progress=False)
        expert_sharded = any(p.dim() == 3 and "ep" in (getattr(getattr(p, "device_mesh", None), "mesh_dim_names", None)
                                                      or ()) for p in result.model.parameters())
        results.append({"losses": result.losses, "expert_sharded": expert_sharded})
    if resume_first_under is not None:
        copy_back_to_step_2(Path(root) / "0", Path(root) / "resumed")
        resumed = train(lora_recipe(Path(root) / "resumed", *resume_first_under), progress=False)
        results.append({"losses": resumed.losses})
    return results
