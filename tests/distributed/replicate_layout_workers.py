"""What each rank runs in tests/distributed/test_replicate_layout.py: `moe train` on the tiny Qwen3-MoE with
`parallel.layout: replicate` (gloo, CPU, fp32)."""

from __future__ import annotations

from pathlib import Path

import torch

from run_copies import copy_back_to_step_2

COMMON = ["data.seq_len=64", "train.micro_batch_size=2", "optim.warmup_steps=1", "optim.lr=3e-3", "train.max_steps=4",
          "checkpoint.every_steps=2", "optim.max_grad_norm=0"]
REPLICATE = ["parallel.layout=replicate", "perf.optimizer=in-backward"]


def recipe(run_dir, *overrides):
    from trainer.config import load_recipe

    return load_recipe("tiny-moe", COMMON + [f"output.dir={run_dir}", *overrides])


def train_resume_under_both_layouts(root: str) -> dict:
    """A straight 4-step replicated run (checkpoints at 2 and 4, export), then copies of it resumed from step 2
    replicated and under FSDP2 (AdamW after the backward, no clipping: the same update). Returns the losses, a
    checksum of the parameters (equal on every replica) and whether they stayed plain tensors."""
    from trainer.train import train

    root = Path(root)
    straight = train(recipe(root / "two", *REPLICATE), progress=False)
    copy_back_to_step_2(root / "two", root / "resumed")
    resumed = train(recipe(root / "resumed", *REPLICATE, "output.export=false"), progress=False)
    copy_back_to_step_2(root / "two", root / "resumed-fsdp")
    resumed_fsdp = train(recipe(root / "resumed-fsdp", "output.export=false"), progress=False)
    params = list(straight.model.parameters())
    return {"losses": straight.losses, "resumed": resumed.losses, "resumed_fsdp": resumed_fsdp.losses,
            "checksum": [float(p.detach().double().sum()) for p in params],
            "plain": not any(hasattr(p, "device_mesh") for p in params)}


def export_logits(export_dir: str) -> torch.Tensor:
    """Logits of plain transformers (no moe_fast) loading an export, on fixed ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits
