"""`moe.aux_free_bias_rate` moves the routers' score-correction biases during training (DeepSeek-V3 style)."""

from __future__ import annotations


import torch

import tiny_configs
from trainer.config import load_recipe
from trainer.train import train

FAST = ["data.seq_len=64", "train.micro_batch_size=2", "train.max_steps=3", "output.export=false", "optim.lr=1e-3"]


def _deepseek_recipe(tmp_path, rate: float):
    config_dir = tmp_path / "deepseek-tiny"
    config = tiny_configs.deepseek_v3(vocab_size=1024)  # the shipped tokenizer's vocabulary
    config.save_pretrained(config_dir)
    overrides = [f"model.name_or_path={config_dir}", "model.tokenizer=builtin:tokenizer", "model.from_config=true",
                 f"moe.aux_free_bias_rate={rate}", f"output.dir={tmp_path / f'run-{rate}'}", *FAST]
    return load_recipe("tiny-moe", overrides)


def _biases(model) -> list[torch.Tensor]:
    return [b.detach().clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]


def test_biases_move_by_rate_times_sign_per_step_only_when_enabled(tmp_path):
    enabled = train(_deepseek_recipe(tmp_path, 0.01), progress=False)
    moved = _biases(enabled.model)
    assert moved and all(b.abs().sum() > 0 for b in moved)
    for bias in moved:  # three updates of +-0.01 (or 0 for an expert exactly at the mean load)
        steps = (bias / 0.01).round()
        assert torch.allclose(bias, steps * 0.01, atol=1e-6) and steps.abs().max() <= 3

    disabled = train(_deepseek_recipe(tmp_path, 0.0), progress=False)
    assert all(b.abs().sum() == 0 for b in _biases(disabled.model))
