"""Validation on several ranks: 2 gloo ranks (torchrun, FSDP2) report the eval loss one process reports on the same
validation set, although the set's micro-batches do not split evenly (one rank runs a filler batch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
# 24 validation samples of the shipped set pack into 11 rows at seq_len 96: 11 micro-batches of one row, so rank 1
# runs 5 and a filler
COMMON = ["data.seq_len=96", "train.micro_batch_size=1", "train.max_steps=2", "output.export=false",
          "data.eval_fraction=0.05", "train.eval_every=2", "--no-progress"]


@pytest.mark.distributed
def test_two_ranks_report_the_one_process_eval_loss(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    train = ["-m", "trainer.cli", "train", "tiny-moe", *COMMON]
    subprocess.run([sys.executable, *train, f"output.dir={tmp_path / 'one'}", "train.grad_accum_steps=2"],
                   cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.Popen([*launcher, *train, f"output.dir={tmp_path / 'two'}"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = two.communicate(timeout=300)
    finally:
        if two.poll() is None:
            os.killpg(two.pid, signal.SIGKILL)
    assert two.returncode == 0, output[-3000:]

    def evals(run):
        return [(r["step"], r["eval_loss"], r["eval_tokens"]) for r in read_metrics(tmp_path / run) if "eval_loss" in r]

    one, two_ranks = evals("one"), evals("two")
    assert [(s, t) for s, _, t in two_ranks] == [(s, t) for s, _, t in one] and len(one) == 1
    # the same weights up to FSDP2's reduction order (see test_train_data_parallel), the same tokens
    assert two_ranks[0][1] == pytest.approx(one[0][1], rel=1e-5)
