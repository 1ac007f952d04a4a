"""Validation on several ranks: 2 gloo ranks (torchrun, FSDP2) report the eval loss one process reports on the same
validation set, although the set's micro-batches do not split evenly (one rank runs a filler batch)."""

from __future__ import annotations

import pytest
from one_and_two_ranks import train_one_process_and_two_ranks

from trainer.metrics import read_metrics

# 24 validation samples of the shipped set pack into 11 rows at seq_len 96: 11 micro-batches of one row, so rank 1
# runs 5 and a filler
COMMON = ["data.seq_len=96", "train.micro_batch_size=1", "train.max_steps=2", "output.export=false",
          "data.eval_fraction=0.05", "train.eval_every=2", "--no-progress"]


@pytest.mark.distributed
def test_two_ranks_report_the_one_process_eval_loss(tmp_path):
    train_one_process_and_two_ranks(tmp_path, "tiny-moe", COMMON)

    def evals(run):
        return [(r["step"], r["eval_loss"], r["eval_tokens"]) for r in read_metrics(tmp_path / run) if "eval_loss" in r]

    one, two_ranks = evals("one"), evals("two")
    assert [(s, t) for s, _, t in two_ranks] == [(s, t) for s, _, t in one] and len(one) == 1
    # the same weights up to FSDP2's reduction order (see test_train_data_parallel), the same tokens
    assert two_ranks[0][1] == pytest.approx(one[0][1], rel=1e-5)
