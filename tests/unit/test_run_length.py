"""The run's length as steps, epochs or tokens: one choice (a later override replaces an earlier one, a recipe file
may name only one), and epochs / tokens become the steps the loader's packing takes."""

from __future__ import annotations

import math

import pytest

from trainer.build import load_tokenizer
from trainer.config import load_recipe
from trainer.data import StatefulLoader
from trainer.data.budget import epoch_shape, run_steps
from trainer.data.prepare import prepare_data
from trainer.errors import UserError


def test_a_later_override_replaces_the_run_length():
    recipe = load_recipe("tiny-moe", ["train.epochs=2"])
    assert (recipe.train.max_steps, recipe.train.epochs, recipe.train.max_tokens) == (0, 2.0, 0)
    recipe = load_recipe("tiny-moe", ["train.epochs=2", "train.max_tokens=1000"])
    assert (recipe.train.max_steps, recipe.train.epochs, recipe.train.max_tokens) == (0, 0, 1000)


def test_a_recipe_file_with_two_run_lengths_is_one_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name_or_path: x\ndata:\n  train_path: d.jsonl\ntrain:\n  max_steps: 5\n  epochs: 1\n")
    with pytest.raises(UserError, match=r"the recipe sets both train.max_steps and train.epochs; keep one of"):
        load_recipe(str(path))
    with pytest.raises(UserError, match=r"the run has no length .*; set train.max_steps=<steps>, train.epochs"):
        load_recipe("tiny-moe", ["train.max_steps=0"])


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    recipe = load_recipe("tiny-moe", ["data.seq_len=128", f"data.cache_dir={tmp_path_factory.mktemp('cache')}"])
    tokenizer = load_tokenizer(recipe.model)
    return recipe, prepare_data(recipe.data, tokenizer).train, tokenizer


def test_one_epoch_is_the_steps_that_consume_every_sample_once(shipped):
    recipe, dataset, tokenizer = shipped
    mbs, accum, ranks = 2, 2, 2
    shape = epoch_shape(dataset, 128, mbs, True, True, 0, mbs * accum * ranks)
    steps = run_steps(load_recipe("tiny-moe", ["train.epochs=1"]).train, shape)
    assert steps == math.ceil(shape.rows / (mbs * accum * ranks))
    loader = StatefulLoader(dataset, 128, mbs, tokenizer.pad_token_id, True, True, 0)
    for _ in range((steps - 1) * accum * ranks):
        next(loader)
    assert loader.epoch == 0  # a step fewer leaves samples of the first epoch unseen
    for _ in range(accum * ranks):
        next(loader)
    assert loader.epoch == 1 or loader.cursor == len(dataset)


def test_a_token_budget_is_the_steps_of_that_many_packed_tokens(shipped):
    recipe, dataset, _ = shipped
    shape = epoch_shape(dataset, 128, 4, True, True, 0, 4)
    assert run_steps(load_recipe("tiny-moe", ["train.max_tokens=51200"]).train, shape) == 100  # 51200 / (128 * 4)
    assert shape.epochs_of(100) == pytest.approx(100 * 4 / shape.rows)
