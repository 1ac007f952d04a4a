"""Nemotron-H checkpoints: HF save -> MoEAutoModelForCausalLM -> save is exact, the config keeps the published
fields, and our safetensors reader (used for sharded loading) agrees with transformers' loader."""

from __future__ import annotations

import copy
import json
import os

import pytest
import tiny_configs
import torch
from checkpoint_files import read_all_tensors
from parity_checks import assert_logits_close
from transformers import AutoConfig, AutoModelForCausalLM

from trainer.checkpoint.hf_io import load_into
from trainer.checkpoint.key_tables import NEMOTRON_H, key_table_for
from trainer.models import MoEAutoModelForCausalLM
from trainer.models.nemotron_h import published_config_dict


def _read_config(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def _saved_hf_model(directory: str, config=None, **save_kwargs):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config or tiny_configs.nemotron_h()))
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.normal_(std=0.1)  # a trained checkpoint's bias is not zero; make sure it travels
    model.save_pretrained(directory, **save_kwargs)
    return model


@pytest.mark.parametrize("sharded", [False, True])
def test_round_trip_is_bit_identical(tmp_path, sharded):
    original, exported = str(tmp_path / "original"), str(tmp_path / "exported")
    save_kwargs = {"max_shard_size": "20KB"} if sharded else {}
    _saved_hf_model(original, **save_kwargs)

    model = MoEAutoModelForCausalLM.from_pretrained(original)
    model.save_pretrained(exported, **save_kwargs)

    before, after = read_all_tensors(original), read_all_tensors(exported)
    assert sorted(before) == sorted(after)
    assert "backbone.layers.1.mixer.experts.7.up_proj.weight" in after  # published layout: backbone., per expert
    for key in before:
        assert before[key].dtype == after[key].dtype, key
        assert torch.equal(before[key], after[key]), key

    ids = torch.randint(0, tiny_configs.VOCAB, (1, 12))
    plain = AutoModelForCausalLM.from_pretrained(exported)
    with torch.no_grad():
        assert_logits_close(plain(ids).logits, model(ids).logits)  # two implementations: kernels differ by CPU


def test_exported_config_has_the_published_layer_pattern_and_keeps_every_field(tmp_path):
    original, exported = str(tmp_path / "original"), str(tmp_path / "exported")
    _saved_hf_model(original)
    MoEAutoModelForCausalLM.from_pretrained(original).save_pretrained(exported)

    written = _read_config(exported)
    assert written["hybrid_override_pattern"] == "ME*-EM"
    assert written["num_hidden_layers"] == 6
    # consumers of the published format define layers_block_type as a read-only property: never write the list
    assert "layers_block_type" not in written and "mtp_layers_block_type" not in written
    assert written["time_step_limit"] == [0.0, float("inf")]  # plain JSON Infinity, as published

    original_fields = {k: v for k, v in _read_config(original).items() if not k.endswith("layers_block_type")}
    assert set(original_fields) <= set(written)
    reread_original, reread_exported = AutoConfig.from_pretrained(original), AutoConfig.from_pretrained(exported)
    assert reread_exported.layers_block_type == reread_original.layers_block_type
    without_path = lambda config: {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert without_path(reread_exported) == without_path(reread_original)


def test_published_format_checkpoint_round_trips_in_the_same_format(tmp_path):
    """A checkpoint as published (pattern string in config.json) comes back out with the same config fields."""
    original, exported = str(tmp_path / "original"), str(tmp_path / "exported")
    model = _saved_hf_model(original)
    published = published_config_dict(model.config, use_diff=True)
    with open(os.path.join(original, "config.json"), "w") as f:
        json.dump(published, f, indent=2)

    MoEAutoModelForCausalLM.from_pretrained(original).save_pretrained(exported)
    written = _read_config(exported)
    for key, value in published.items():
        if key not in ("transformers_version", "dtype"):
            assert written[key] == value, key


def test_key_table_maps_memory_names_to_published_keys_both_ways():
    assert key_table_for("nemotron_h") is NEMOTRON_H
    assert NEMOTRON_H.to_disk_name("model.embeddings.weight") == "backbone.embeddings.weight"
    assert NEMOTRON_H.to_disk_name("model.norm_f.weight") == "backbone.norm_f.weight"
    assert NEMOTRON_H.to_disk_name("lm_head.weight") == "lm_head.weight"
    assert NEMOTRON_H.expert_disk_keys("model.layers.3.mixer.experts.up_proj", 5) == [
        "backbone.layers.3.mixer.experts.5.up_proj.weight"
    ]
    assert NEMOTRON_H.expert_disk_keys("model.layers.3.mixer.experts.down_proj", 0) == [
        "backbone.layers.3.mixer.experts.0.down_proj.weight"
    ]


@pytest.mark.parametrize("latent", [None, 16])
def test_safetensors_reader_fills_the_model_like_transformers(tmp_path, latent):
    directory = str(tmp_path / "ckpt")
    _saved_hf_model(directory, tiny_configs.nemotron_h(moe_latent_size=latent), max_shard_size="20KB")
    reference = AutoModelForCausalLM.from_pretrained(directory)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(reference.config))
    model.to_empty(device="cpu")
    load_into(model, directory, NEMOTRON_H)
    expected = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_reader_loads_only_this_ranks_experts(tmp_path):
    directory = str(tmp_path / "ckpt")
    full = _saved_hf_model(directory)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(full.config))
    for experts in (m for m in model.modules() if type(m).__name__ == "NemotronHExperts"):
        # this rank holds experts 4..7 of 8 (what expert parallelism leaves in dim 0)
        experts.up_proj = torch.nn.Parameter(torch.empty_like(experts.up_proj[:4]))
        experts.down_proj = torch.nn.Parameter(torch.empty_like(experts.down_proj[:4]))
    load_into(model, directory, NEMOTRON_H, expert_range=(4, 8))
    for name in ("model.layers.1.mixer.experts.up_proj", "model.layers.4.mixer.experts.down_proj"):
        assert torch.equal(model.state_dict()[name], full.state_dict()[name][4:8])
