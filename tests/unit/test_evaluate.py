"""Validation during training through `moe train`'s own loop: the eval loss is the token mean a separate forward pass
over the same validation set gives, the best step's checkpoint is kept and recorded, and a run without a new best
for `train.early_stop_patience` evaluations stops."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from trainer.build import load_tokenizer
from trainer.config import load_recipe
from trainer.data import IGNORE_INDEX
from trainer.data.prepare import prepare_data
from trainer.metrics import read_metrics
from trainer.train import train

FAST = ["data.seq_len=128", "train.micro_batch_size=2", "train.log_every=1", "optim.warmup_steps=2",
        "output.export=false", "data.eval_fraction=0.05"]


def _recipe(run_dir, *overrides):
    return load_recipe("tiny-moe", FAST + [f"output.dir={run_dir}", *overrides])


def _separate_eval_loss(model, dataset) -> float:
    """Token-mean cross-entropy, one sample per forward, plain logits (no packing, no fused loss)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            ids = torch.tensor([sample.input_ids])
            logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], use_cache=False).logits
            targets = torch.tensor(sample.targets())
            total += F.cross_entropy(logits[0].double(), targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    return total / count


def test_eval_loss_matches_a_separate_forward_pass_over_the_eval_set(tmp_path):
    recipe = _recipe(tmp_path / "run", "train.max_steps=4", "train.eval_every=2")
    result = train(recipe, progress=False)
    assert [s for s, _ in result.eval_losses] == [2, 4]
    evaluation = prepare_data(recipe.data, load_tokenizer(recipe.model), recipe.train.seed).eval
    # fp32 on the CPU: packed rows and the chunked loss sum in another order than one sample at a time
    assert result.eval_losses[-1][1] == pytest.approx(_separate_eval_loss(result.model, evaluation), abs=1e-6)
    records = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
    assert [(r["step"], r["eval_loss"]) for r in records] == result.eval_losses
    assert records[-1]["eval_tokens"] == sum(sum(1 for t in evaluation[i].targets() if t != IGNORE_INDEX)
                                             for i in range(len(evaluation)))
    assert (tmp_path / "run" / "tensorboard").is_dir() and (tmp_path / "run" / "loss.png").is_file()


def test_best_checkpoint_is_kept_recorded_and_early_stop_ends_the_run(tmp_path):
    # lr far too high: the validation loss falls, then climbs; patience 2 stops the run two evaluations later
    run = tmp_path / "run"
    result = train(_recipe(run, "train.max_steps=40", "train.eval_every=2", "train.early_stop_patience=2",
                           "optim.lr=0.05", "checkpoint.keep_last=1"), progress=False)
    assert result.stopped_early and result.step < 40
    losses = dict(result.eval_losses)
    best_step = min(losses, key=losses.get)
    best = json.loads((run / "best.json").read_text())
    assert best == {"step": best_step, "eval_loss": losses[best_step], "checkpoint": f"checkpoints/step_{best_step:08d}"}
    assert (run / best["checkpoint"] / "meta.json").is_file()  # kept although keep_last=1
    assert result.step == best_step + 2 * 2  # two evaluations without a new best
    assert (run / "checkpoints" / f"step_{result.step:08d}").is_dir()  # the final checkpoint beside it


def test_a_resumed_run_continues_from_the_recorded_best(tmp_path):
    run = tmp_path / "run"
    common = ["train.eval_every=2", "checkpoint.every_steps=2"]
    train(_recipe(run, "train.max_steps=4", *common), progress=False)
    best = json.loads((run / "best.json").read_text())
    resumed = train(_recipe(run, "train.max_steps=6", *common), progress=False)
    assert resumed.eval_losses[0][0] == 6
    now = json.loads((run / "best.json").read_text())
    assert now["step"] in (best["step"], 6)
    assert now["eval_loss"] <= best["eval_loss"]
