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
    from trainer import step as step_module

    real, calls = step_module.forward_loss_sum, []

    def nan_on_second_step(model, batch, fused_ce=False):
        calls.append(1)
        loss, aux = real(model, batch, fused_ce)
        return (loss * float("nan") if len(calls) == 2 else loss), aux

    monkeypatch.setattr(step_module, "forward_loss_sum", nan_on_second_step)
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


def test_a_missing_latest_pointer_resumes_from_the_newest_checkpoint_not_from_step_0(tmp_path):
    run = tmp_path / "run"
    train(_recipe(run, "train.max_steps=2", "checkpoint.every_steps=1"), progress=False)
    (run / "checkpoints/latest").unlink()  # lost with a crash, or deleted by hand
    resumed = train(_recipe(run, "train.max_steps=3", "checkpoint.every_steps=1"), progress=False)
    assert resumed.step == 3 and len(resumed.losses) == 1  # continued after step 2
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]
    assert (run / "checkpoints/latest").read_text() == "step_00000003"


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    run = tmp_path / "run"
    train(_recipe(run, "train.max_steps=1"), progress=False)
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 2, "loss": 3.1')  # the kill came in the middle of step 2's line
    train(_recipe(run, "train.max_steps=2"), progress=False)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_a_directory_is_replaced_in_one_swap_and_recovered_after_a_kill_between_the_fallback_renames(tmp_path,
                                                                                                      monkeypatch):
    from trainer.checkpoint import durable

    def tree(name: str, text: str):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_text(text)
        return tmp_path / name

    target = tree("export", "old")
    durable.replace_dir(tree(".tmp-export", "new"), target)  # renameat2(RENAME_EXCHANGE) here
    assert (target / "model.safetensors").read_text() == "new" and not (tmp_path / ".tmp-export").exists()

    monkeypatch.setattr(durable, "exchange", lambda a, b: False)  # a filesystem without the atomic exchange
    durable.replace_dir(tree(".tmp-export", "newer"), target)
    assert (target / "model.safetensors").read_text() == "newer" and not (tmp_path / ".old-export").exists()
    target.rename(tmp_path / ".old-export")  # what a kill between the fallback's two renames leaves
    durable.recover_dir(target)
    assert (target / "model.safetensors").read_text() == "newer"


def test_checkpoint_files_carry_checksums_that_a_resume_verifies(tmp_path):
    import json

    run = tmp_path / "run"
    train(_recipe(run, "train.max_steps=1"), progress=False)
    checkpoint = run / "checkpoints/step_00000001"
    files = json.loads((checkpoint / "meta.json").read_text())["files"]
    assert set(files) == {p.name for p in checkpoint.iterdir() if p.name != "meta.json"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in files.values())
    dcp_module.verify_checkpoint(checkpoint)  # intact: passes
    shard = checkpoint / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, last byte changed
    dcp_module._VERIFIED.clear()  # a new process would hash again
    with pytest.raises(UserError, match="is corrupt: __0_0.distcp does not match the checksum"):
        train(_recipe(run, "train.max_steps=2"), progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000001"]  # nothing pruned
