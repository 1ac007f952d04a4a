"""HF checkpoint -> MoEAutoModelForCausalLM -> save_pretrained is exact, and our safetensors reader agrees with HF's."""

from __future__ import annotations

import copy
import json
import os

import pytest
import tiny_configs
import torch
from checkpoint_files import read_all_tensors
from parity_checks import assert_logits_close
from transformers import AutoModelForCausalLM

from trainer.checkpoint.hf_io import load_into
from trainer.checkpoint.key_tables import key_table_for
from trainer.errors import UserError
from trainer.models import MoEAutoModelForCausalLM, resolve_adapter


def _saved_hf_model(family: str, directory: str, **save_kwargs):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(tiny_configs.FAMILIES[family]()))
    model.save_pretrained(directory, **save_kwargs)
    return model


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "olmoe"])
@pytest.mark.parametrize("sharded", [False, True])
def test_round_trip_is_bit_identical_and_loads_in_plain_transformers(tmp_path, family, sharded):
    original, exported = str(tmp_path / "original"), str(tmp_path / "exported")
    save_kwargs = {"max_shard_size": "20KB"} if sharded else {}
    _saved_hf_model(family, original, **save_kwargs)

    model = MoEAutoModelForCausalLM.from_pretrained(original)
    model.save_pretrained(exported, **save_kwargs)

    before, after = read_all_tensors(original), read_all_tensors(exported)
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key], after[key]), key
    if sharded:
        with open(os.path.join(original, "model.safetensors.index.json")) as f1, open(
            os.path.join(exported, "model.safetensors.index.json")
        ) as f2:
            assert json.load(f1)["weight_map"] == json.load(f2)["weight_map"]

    ids = torch.randint(0, tiny_configs.VOCAB, (1, 12))
    plain = AutoModelForCausalLM.from_pretrained(exported)
    with torch.no_grad():
        assert_logits_close(plain(ids).logits, model(ids).logits)  # two implementations: kernels differ by CPU


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_safetensors_reader_fills_stacked_experts_like_transformers(tmp_path, family):
    directory = str(tmp_path / "ckpt")
    _saved_hf_model(family, directory, max_shard_size="20KB")
    reference = AutoModelForCausalLM.from_pretrained(directory)

    config = copy.deepcopy(reference.config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    model.init_weights()  # non-persistent buffers (rotary inv_freq)
    load_into(model, directory, key_table_for(config.model_type))
    for (name, a), (_, b) in zip(reference.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def test_reader_loads_only_this_ranks_experts(tmp_path):
    directory = str(tmp_path / "ckpt")
    full = _saved_hf_model("qwen3_moe", directory)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(full.config))
    for experts in (m for m in model.modules() if type(m).__name__ == "Qwen3MoeExperts"):
        # this rank holds experts 4..7 of 8 (what expert parallelism leaves in dim 0)
        experts.gate_up_proj = torch.nn.Parameter(torch.empty_like(experts.gate_up_proj[:4]))
        experts.down_proj = torch.nn.Parameter(torch.empty_like(experts.down_proj[:4]))
    load_into(model, directory, key_table_for("qwen3_moe"), expert_range=(4, 8))
    layer = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(model.state_dict()[layer], full.state_dict()[layer][4:8])


def test_missing_shard_file_is_a_clear_error(tmp_path):
    directory = str(tmp_path / "ckpt")
    _saved_hf_model("qwen3_moe", directory, max_shard_size="20KB")
    os.remove(os.path.join(directory, "model-00002-of-" + sorted(os.listdir(directory))[-2].split("-of-")[1]))
    model = AutoModelForCausalLM.from_config(tiny_configs.qwen3_moe())
    with pytest.raises(UserError, match=r"missing shard file\(s\) model-00002-of"):
        load_into(model, directory, key_table_for("qwen3_moe"))


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    directory = str(tmp_path / "ckpt")
    _saved_hf_model("qwen3_moe", directory)
    model = AutoModelForCausalLM.from_config(tiny_configs.qwen3_moe(moe_intermediate_size=24))
    with pytest.raises(UserError, match=r"mlp\.experts\.0\.gate_proj\.weight has shape \(16, 32\) but the model expects \(24, 32\)"):
        load_into(model, directory, key_table_for("qwen3_moe"))


def test_incompatible_config_is_a_clear_error():
    with pytest.raises(UserError, match="num_experts_per_tok=9"):
        resolve_adapter(tiny_configs.qwen3_moe(num_experts_per_tok=9))
    with pytest.raises(UserError, match="n_group=3"):
        resolve_adapter(tiny_configs.deepseek_v3(n_group=3))


def test_model_path_that_does_not_exist_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        MoEAutoModelForCausalLM.from_pretrained(str(tmp_path / "nope"))
