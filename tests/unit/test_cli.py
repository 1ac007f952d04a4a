"""The `moe` command line: options anywhere among the key=value overrides, usage mistakes in one line."""

from __future__ import annotations

from trainer.cli import main as moe


def test_plan_takes_options_before_between_and_after_the_overrides(capsys):
    after = moe(["plan", "tiny-moe", "data.seq_len=128", "--gpus", "2", "--gpu-mem", "40"])
    first = capsys.readouterr().out
    between = moe(["plan", "tiny-moe", "--gpus", "2", "data.seq_len=128", "--gpu-mem", "40", "train.max_steps=3"])
    second = capsys.readouterr().out
    assert after == between == 0
    assert "seq 128" in first and "2 x" in first
    assert first.splitlines()[:3] == second.splitlines()[:3]


def test_train_reads_overrides_after_its_flags(capsys):
    # the override is read (and refused) although it comes after --no-progress: nothing is trained
    assert moe(["train", "tiny-moe", "--no-progress", "optim.lrr=1e-4"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown recipe key 'optim.lrr'")


def test_a_usage_mistake_is_one_line_exit_2(capsys):
    assert moe(["plan", "tiny-moe", "--gpus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --gpus: expected one argument")
    assert moe(["help-me"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
