"""On a CUDA GPU the same loop runs bf16 autocast over fp32 master weights with fused AdamW.

Run on a GPU machine: `python -m pytest -q -m gpu tests/unit/test_train_gpu.py` (skipped without CUDA).
"""

from __future__ import annotations

import json

import pytest
import torch

from trainer.config import load_recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_tiny_moe_trains_in_bf16_mixed_with_fp32_master_weights_and_exports_bf16(tmp_path):
    from trainer.train import train

    recipe = load_recipe("tiny-moe", [f"output.dir={tmp_path / 'run'}", "train.max_steps=60", "checkpoint.every_steps=30"])
    result = train(recipe, progress=False)
    assert next(result.model.parameters()).dtype == torch.float32  # master weights
    assert next(result.model.parameters()).is_cuda
    assert sum(result.losses[-10:]) / 10 < 0.7 * sum(result.losses[:10]) / 10
    assert json.loads((result.export_dir / "config.json").read_text())["dtype"] == "bfloat16"
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert records[-1]["peak_memory_gib"] > 0 and records[-1]["mfu"] > 0
