"""Reliability in process: pre-emption by SIGUSR1, a second signal, the non-finite guard, the disk-space check,
output safety, and checkpoints that cannot run code or hide a missing shard."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from trainer.checkpoint import dcp as dcp_module
from trainer.config import load_recipe
from trainer.errors import UserError
from trainer.metrics import read_metrics
from trainer.preemption import PreemptionGuard
from trainer.train import train

TINY = ["data.seq_len=64", "train.micro_batch_size=2", "optim.warmup_steps=1", "output.export=false",
        "train.log_every=1"]


def _recipe(run_dir, *overrides):
    return load_recipe("tiny-moe", TINY + [f"output.dir={run_dir}", *overrides])


def _signal_after_step(run_dir, step: int, signum: int) -> None:
    """Send `signum` to this process once `step`'s metrics line is written (the loop is then paused)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= step:
            break
        time.sleep(0.02)
    os.kill(os.getpid(), signum)


def test_sigusr1_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    straight = train(_recipe(tmp_path / "straight", "train.max_steps=4"), progress=False)

    monkeypatch.setenv("MOE_FAULT_PAUSE_AFTER_STEP", "2")  # the loop waits after step 2 until a signal arrives
    sender = threading.Thread(target=_signal_after_step, args=(tmp_path / "run", 2, signal.SIGUSR1))
    sender.start()
    stopped = train(_recipe(tmp_path / "run", "train.max_steps=4", "checkpoint.every_steps=0"), progress=False)
    sender.join()
    assert stopped.preempted == "SIGUSR1" and stopped.step == 2
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step_00000002"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored after the run

    monkeypatch.delenv("MOE_FAULT_PAUSE_AFTER_STEP")
    resumed = train(_recipe(tmp_path / "run", "train.max_steps=4"), progress=False)
    assert stopped.losses + resumed.losses == straight.losses


def test_a_second_signal_exits_at_once():
    exits = []
    guard = PreemptionGuard()
    guard.exit_now = exits.append  # the real one re-raises the signal with its default action (the process dies)
    with guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.received == signal.SIGTERM and guard.should_stop() and exits == []
        os.kill(os.getpid(), signal.SIGTERM)
    assert exits == [signal.SIGTERM]


def test_a_non_finite_step_is_skipped_without_touching_weights_or_optimizer_state(tmp_path, monkeypatch):
    one = train(_recipe(tmp_path / "one", "train.max_steps=1"), progress=False)
    from trainer import train as train_module

    real, calls = train_module.forward_loss_sum, []

    def nan_on_second_step(model, batch, fused_ce=False):
        calls.append(1)
        loss, aux = real(model, batch, fused_ce)
        return (loss * float("nan") if len(calls) == 2 else loss), aux

    monkeypatch.setattr(train_module, "forward_loss_sum", nan_on_second_step)
    two = train(_recipe(tmp_path / "two", "train.max_steps=2"), progress=False)
    records = read_metrics(tmp_path / "two")
    assert records[1].get("skipped") and not records[0].get("skipped")
    for (name, p), q in zip(one.model.named_parameters(), two.model.parameters()):
        assert torch.equal(p, q), name  # the NaN step changed nothing


def test_a_checkpoint_that_does_not_fit_on_disk_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(dcp_module, "free_bytes", lambda directory: 1024)
    with pytest.raises(UserError, match=r"^not enough disk space for checkpoint step 1 in .*needs about .* GiB"):
        train(_recipe(tmp_path / "run", "train.max_steps=1"), progress=False)
    assert not list((tmp_path / "run/checkpoints").glob("*"))  # no temporary, no pointer


def test_the_checkpoint_size_estimate_counts_model_and_optimizer_state(tmp_path):
    result = train(_recipe(tmp_path / "run", "train.max_steps=1"), progress=False)
    params = sum(p.numel() * p.element_size() for p in result.model.parameters())
    on_disk = sum(f.stat().st_size for f in (tmp_path / "run/checkpoints/step_00000001").glob("*.distcp"))
    assert 3 * params <= on_disk  # weights + two AdamW moments
    from trainer.checkpoint.dcp import state_bytes

    assert state_bytes({"w": torch.zeros(10, 10), "x": [torch.zeros(5, dtype=torch.bfloat16)], "n": 3}) == 410


def test_a_fresh_run_refuses_a_directory_holding_another_export(tmp_path):
    (tmp_path / "run/export").mkdir(parents=True)
    (tmp_path / "run/export/model.safetensors").write_bytes(b"someone else's")
    with pytest.raises(UserError, match="already holds another run \\(an export\\)"):
        train(_recipe(tmp_path / "run", "train.max_steps=1"), progress=False)
    assert (tmp_path / "run/export/model.safetensors").read_bytes() == b"someone else's"


def test_checkpoint_byte_items_must_load_as_plain_data(tmp_path):
    import io

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    buffer = io.BytesIO()
    torch.save({"x": print}, buffer)  # a reference to a callable: what a code-running pickle is made of
    buffer.seek(0)
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("trainer.scheduler"), torch.Size([0]),
                    MetadataIndex("trainer.scheduler"), torch.Size([0]), torch.Size([0]))
    with pytest.raises(UserError, match="holds more than plain data"):
        dcp_module._WeightsOnlyLoadPlanner().load_bytes(item, buffer)
