"""Kill -9 mid-run, start the same command again: the resumed run reproduces the uninterrupted one step for step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SMALL = ["data.seq_len=96", "train.micro_batch_size=2", "train.max_steps=20", "checkpoint.every_steps=10",
         "optim.warmup_steps=3", "output.export=false"]


def _command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "train", "tiny-moe", *SMALL, f"output.dir={run_dir}", "--no-progress"]


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_per_step_losses(tmp_path):
    straight = tmp_path / "straight"
    subprocess.run(_command(straight), env=_env(), cwd=REPO, check=True, capture_output=True, timeout=300)

    interrupted = tmp_path / "interrupted"
    # The process stops making progress right after its step-10 checkpoint; we kill it there with SIGKILL.
    process = subprocess.Popen(_command(interrupted), env=_env(MOE_FAULT_HANG_AFTER_CHECKPOINT="10"), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = interrupted / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    try:
        while not (latest.exists() and latest.read_text() == "step_00000010"):
            assert process.poll() is None, "the run ended before its step-10 checkpoint"
            assert time.monotonic() < deadline, "no step-10 checkpoint in time"
            time.sleep(0.2)
    finally:
        os.kill(process.pid, signal.SIGKILL)  # also when the wait above failed: never leave it hanging
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert max(_losses(interrupted)) == 10

    resumed = subprocess.run(_command(interrupted), env=_env(), cwd=REPO, check=True, capture_output=True, text=True,
                             timeout=300)
    assert "resumed from" in resumed.stdout and "step_00000010" in resumed.stdout
    expected, got = _losses(straight), _losses(interrupted)
    assert sorted(got) == list(range(1, 21))
    assert got == expected  # exact: same data order, same weights, same optimizer and schedule state
