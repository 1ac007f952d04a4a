"""Several datasets mixed by weight: the stream holds each at its weight (within 2% over any 10k samples), the order
is a pure function of (seed, epoch), and the loader over a mixture resumes exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.build import load_tokenizer
from trainer.config import load_recipe
from trainer.data import StatefulLoader
from trainer.data.mixing import MixedDataset
from trainer.data.prepare import prepare_data
from trainer.errors import UserError


class Lengths:
    """A dataset of n samples (only lengths matter to the mixing order)."""

    def __init__(self, n: int):
        self.lengths = np.full(n, 8, dtype=np.int32)
        self.samples = self

    def __len__(self):
        return len(self.lengths)


def test_weights_hold_within_two_percent_over_10k_samples():
    sizes, weights = [3000, 50_000, 800], [5.0, 3.0, 2.0]
    mixed = MixedDataset([Lengths(n) for n in sizes], weights)
    order = np.asarray(mixed.epoch_order(epoch=0, seed=1))
    source = np.searchsorted(mixed.starts, order, side="right") - 1
    for window in (source[:10_000], source[20_000:30_000]):
        share = np.bincount(window, minlength=3) / len(window)
        assert np.abs(share - np.array(weights) / sum(weights)).max() < 0.02, share
    # the small, heavily weighted dataset is cycled (each sample several times per epoch), the large one subsampled
    assert np.bincount(order[source == 0] - mixed.starts[0]).min() >= 8
    assert mixed.epoch_order(0, 1) == mixed.epoch_order(0, 1) != mixed.epoch_order(1, 1)


def _write(path, n, tag):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{tag} {i}?"},
                                                     {"role": "assistant", "content": f"{tag} {i}."}]}) + "\n"
                            for i in range(n)))
    return str(path)


def test_a_mixture_from_the_recipe_trains_resumably(tmp_path):
    a, b = _write(tmp_path / "a.jsonl", 40, "alpha"), _write(tmp_path / "b.jsonl", 200, "beta")
    recipe = load_recipe("tiny-moe", ["data.train_path=", f"data.sources=[{{path: {a}, weight: 1}}, "
                                      f"{{path: {b}, weight: 1}}]", f"data.cache_dir={tmp_path / 'cache'}"])
    tokenizer = load_tokenizer(recipe.model)
    data = prepare_data(recipe.data, tokenizer)
    assert isinstance(data.train, MixedDataset) and data.train.counts == [120, 120]

    def loader():
        return StatefulLoader(data.train, 64, 2, tokenizer.pad_token_id, True, True, 0)

    first = loader()
    for _ in range(5):
        next(first)
    state = first.state_dict()
    expected = [next(first)["input_ids"] for _ in range(30)]  # crosses into the next mixture epoch
    resumed = loader()
    resumed.load_state_dict(state)
    assert all((next(resumed)["input_ids"] == e).all() for e in expected)


def test_a_source_without_path_or_with_a_bad_weight_is_one_line():
    with pytest.raises(UserError, match=r"data.sources\[1\].weight must be a number > 0, got 0; set"):
        load_recipe("tiny-moe", ["data.train_path=", "data.sources=[{path: a.jsonl}, {path: b.jsonl, weight: 0}]"])
    with pytest.raises(UserError, match=r"data.sources\[0\] has the unknown key 'wieght'; use the keys path, weight"):
        load_recipe("tiny-moe", ["data.train_path=", "data.sources=[{path: a.jsonl, wieght: 2}]"])
