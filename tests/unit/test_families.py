"""Every family the library path accepts trains through `moe train` with the default recipe (the tiny-moe preset
with only the model swapped), and the FLOPs count (metrics, MFU) handles every MoE layout transformers ships.

Hybrids other than Nemotron-H (Jamba: Mamba1 mixers and MoE every other layer; GraniteMoeHybrid: Mamba2 mixers
each followed by an MoE) used to crash in the FLOPs count; GPT-OSS has no sdpa attention (the default `auto` picks
eager there); multimodal MoE configs keep the MoE fields under text_config and must still take the fast path.
"""

from __future__ import annotations

import json
import warnings

import pytest
import tiny_configs
import transformers

from trainer.cli import main as moe
from trainer.flops import flops_per_token
from trainer.models.base import num_experts

SHIPPED_VOCAB = 1024  # the builtin tokenizer's
JOB = ["data.seq_len=32", "train.micro_batch_size=2", "train.max_steps=2", "output.export=false",
       "checkpoint.every_steps=0", "--no-progress"]
FAMILIES = {
    "mixtral": lambda: tiny_configs.mixtral(vocab_size=SHIPPED_VOCAB),
    "deepseek_v3": lambda: tiny_configs.deepseek_v3(vocab_size=SHIPPED_VOCAB),
    "qwen2_moe": lambda: tiny_configs.qwen2_moe(vocab_size=SHIPPED_VOCAB),
    "olmoe": lambda: tiny_configs.olmoe(vocab_size=SHIPPED_VOCAB),
    "nemotron_h": lambda: tiny_configs.nemotron_h(vocab_size=SHIPPED_VOCAB),
    "jamba": lambda: tiny_configs.jamba(vocab_size=SHIPPED_VOCAB),
    "granitemoehybrid": lambda: tiny_configs.granitemoehybrid(vocab_size=SHIPPED_VOCAB),
    "gpt_oss": lambda: tiny_configs.gpt_oss(vocab_size=SHIPPED_VOCAB),
    "qwen3_5_moe": lambda: tiny_configs.qwen3_5_moe(vocab_size=SHIPPED_VOCAB),
    "llama4": lambda: tiny_configs.llama4(vocab_size=SHIPPED_VOCAB),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_through_moe_train_with_the_default_recipe(family, tmp_path, capsys):
    model_dir = tmp_path / "model"
    FAMILIES[family]().save_pretrained(model_dir)
    code = moe(["train", "tiny-moe", f"model.name_or_path={model_dir}", f"output.dir={tmp_path / 'run'}", *JOB])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "trained to step 2" in captured.out
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert all(r["tflops"] > 0 for r in records)  # the FLOPs count ran for this family's layout


def test_multimodal_moe_configs_take_the_fast_path():
    from trainer.models import MoEAutoModelForCausalLM

    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_5_moe())
    assert model.config.get_text_config()._experts_implementation == "moe_fast"
    assert getattr(model, "moe_adapter", None) is not None


def test_the_flops_count_handles_every_moe_family_transformers_ships():
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    counted = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
                try:
                    config = AutoConfig.for_model(model_type)
                except Exception:  # noqa: BLE001 - families whose default config cannot be built alone
                    continue
                if not num_experts(config):
                    continue
                assert flops_per_token(config, 128) > 0, model_type
                counted.append(model_type)
        finally:
            transformers.logging.set_verbosity(verbosity)
    assert {"jamba", "granitemoehybrid", "nemotron_h", "gpt_oss", "qwen3_5_moe", "qwen3_moe"} <= set(counted)
