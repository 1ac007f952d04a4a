"""A few training steps of a small Qwen3-MoE on one GPU with `trainer.perf` options (the GPU tests' shared loop)."""

from __future__ import annotations

import torch

import tiny_configs
from perf_options import perf_options
from trainer.models import MoEAutoModelForCausalLM
from trainer.perf import apply_optimizations
from training_loop import train_steps


def train_tiny_moe(spec: tuple[str, ...] | list[str], steps: int, batch: int = 2, dtype: torch.dtype = torch.bfloat16,
                   apply: bool = True, prepare=None, rows: tuple[int, int] = (0, 1), max_grad_norm: float = 0.0,
                   **config_overrides):
    """Seeded model and token ids, `steps` TrainSteps (lr 1e-3) with the perf overrides `spec` (e.g.
    ("fused_ce=on", "optimizer=overlap"), from the plain step: `perf_options`), resolved for CUDA and patched into
    the model when `apply`, after `prepare(model)` if given. `rows` = (rank, ranks): train on that share of the
    batch's rows, the step's token mean taken over the ranks; clipping at `max_grad_norm` (0: off). Returns (model,
    losses, optimizer, options)."""
    torch.manual_seed(0)
    config = tiny_configs.qwen3_moe(**{**dict(output_router_logits=True, router_aux_loss_coef=0.01, hidden_size=256,
                                              intermediate_size=512, moe_intermediate_size=256, vocab_size=4096,
                                              max_position_embeddings=512), **config_overrides})
    with torch.device("cuda"):
        model = MoEAutoModelForCausalLM.from_config(config).to(dtype)
    ids = torch.randint(0, config.vocab_size, (batch, 256), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(1)).chunk(rows[1])[rows[0]]
    if prepare is not None:
        prepare(model)
    options = perf_options(*spec, device="cuda", world_size=rows[1])
    if apply:
        apply_optimizations(model, options)
    optimizer, losses = train_steps(model, options, ids, steps, lr=1e-3, world_size=rows[1], max_grad_norm=max_grad_norm)
    torch.cuda.synchronize()
    return model, losses, optimizer, options
