"""DCP checkpoints: everything a step depends on comes back, writes are atomic, old ones are pruned, export works."""

from __future__ import annotations

import json
import random

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from perf_options import perf_options
from trainer.checkpoint.dcp import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.cli import main as moe
from trainer.config import OptimConfig, resolve_path
from trainer.data import StatefulLoader, build_dataset
from trainer.errors import EXIT_USER_ERROR
from trainer.models import MoEAutoModelForCausalLM
from trainer.optim import build_optimizer, build_scheduler


def _parts(seed: int):
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(resolve_path("builtin:tiny-qwen3-moe"))
    model = MoEAutoModelForCausalLM.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("builtin:tokenizer"))
    dataset = build_dataset(resolve_path("builtin:data/sft.jsonl"), tokenizer, 128)
    loader = StatefulLoader(dataset, 128, 2, tokenizer.pad_token_id, seed=0)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, warmup_steps=2), perf_options())
    scheduler = build_scheduler(optimizer, OptimConfig(lr=1e-3, warmup_steps=2), max_steps=10)
    return model, optimizer, scheduler, loader


def _step(model, optimizer, scheduler, loader) -> float:
    batch = next(loader)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["targets"], ignore_index=-100)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return loss.item()


def test_save_then_load_restores_model_optimizer_schedule_and_data_position(tmp_path):
    parts = _parts(seed=0)
    for _ in range(3):
        _step(*parts)
    save_checkpoint(tmp_path, 3, *parts, keep_last=2, recipe={})
    expected_losses = [_step(*parts) for _ in range(3)]

    restored = _parts(seed=123)  # different init, fresh optimizer and schedule, loader at the start
    assert load_checkpoint(latest_checkpoint(tmp_path), *restored) == 3
    assert restored[2].last_epoch == 3
    assert [_step(*restored) for _ in range(3)] == expected_losses  # bit for bit


def test_rng_state_comes_back(tmp_path):
    parts = _parts(seed=0)
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    save_checkpoint(tmp_path, 1, *parts, keep_last=1, recipe={})
    draws = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    load_checkpoint(latest_checkpoint(tmp_path), *parts)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(draws[0], again[0]) and draws[1:] == again[1:]


def test_latest_moves_last_and_old_checkpoints_are_pruned(tmp_path):
    parts = _parts(seed=0)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, *parts, keep_last=2, recipe={"note": step})
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path) == root / "step_00000003"
    assert json.loads((root / "step_00000003/meta.json").read_text())["recipe"] == {"note": 3}


def test_a_half_written_checkpoint_is_never_picked_up(tmp_path):
    parts = _parts(seed=0)
    save_checkpoint(tmp_path, 1, *parts, keep_last=2, recipe={})
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000002").mkdir()  # a save killed midway leaves only this
    (root / "step_00000003").mkdir()  # a directory without meta.json is not a checkpoint either
    assert latest_checkpoint(tmp_path) == root / "step_00000001"


def test_moe_export_writes_a_checkpoint_transformers_loads_and_refuses_non_empty_targets(tmp_path):
    from trainer.config import load_recipe
    from trainer.train import train

    run = tmp_path / "run"
    recipe = load_recipe("tiny-moe", [f"output.dir={run}", "train.max_steps=2", "checkpoint.every_steps=1",
                                      "data.seq_len=128", "train.micro_batch_size=2", "output.export=false"])
    result = train(recipe, progress=False)
    assert moe(["export", str(run / "checkpoints/step_00000001"), str(tmp_path / "at_step_1")]) == 0
    assert moe(["export", str(run), str(tmp_path / "latest")]) == 0

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "latest").eval()
    ids = torch.randint(0, reloaded.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    step_1 = AutoModelForCausalLM.from_pretrained(tmp_path / "at_step_1")
    assert not torch.equal(step_1.lm_head.weight, reloaded.lm_head.weight)
    assert AutoTokenizer.from_pretrained(tmp_path / "latest").chat_template

    (tmp_path / "full").mkdir()
    (tmp_path / "full/keep.txt").write_text("x")
    assert moe(["export", str(run), str(tmp_path / "full")]) == EXIT_USER_ERROR
    assert (tmp_path / "full/keep.txt").read_text() == "x"
    # --overwrite replaces an earlier export, never a directory of someone's files
    assert moe(["export", str(run), str(tmp_path / "full"), "--overwrite"]) == EXIT_USER_ERROR
    assert (tmp_path / "full/keep.txt").read_text() == "x"
    assert moe(["export", str(run / "checkpoints/step_00000001"), str(tmp_path / "latest"), "--overwrite"]) == 0
    step_1_again = AutoModelForCausalLM.from_pretrained(tmp_path / "latest")
    assert torch.equal(step_1_again.lm_head.weight, step_1.lm_head.weight)
    assert moe(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == EXIT_USER_ERROR


def test_export_in_bf16_leaves_the_trained_fp32_weights_untouched(tmp_path):
    from trainer.checkpoint.export import export_hf

    model = _parts(seed=0)[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_hf(model, None, tmp_path / "out", torch.bfloat16)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert json.loads((tmp_path / "out/config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").lm_head.weight.dtype == torch.bfloat16
