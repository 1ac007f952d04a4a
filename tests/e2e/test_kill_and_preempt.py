"""Real signals against a real `moe train` process: nothing trained is lost, and resuming is exact.

- One run killed four times, resumed after each (`resume: auto`, a checkpoint every step): first with SIGKILL in
  the middle of writing a checkpoint (the half-written temporary is ignored and cleared, the previous checkpoint is
  used), then with SIGKILL at three random moments (seeded); its per-step losses equal an uninterrupted run's.
- SIGTERM, or SIGINT (Ctrl-C) -> the step finishes, a checkpoint is written, exit 0; resuming is exact.
- A second SIGTERM while the first one's checkpoint is being written -> the process dies at once.
- A second trainer started in the directory of a running one is refused (the output.dir lock), changing nothing.
- SIGKILL while `moe export` swaps a new export in -> the previous export is intact, the next export succeeds.

Every run is the same tiny job (seq 64, 10 steps) so one uninterrupted reference serves all of them. Each process
costs seconds of imports, so the kills share one run (9 processes in all).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 10
JOB = ["data.seq_len=64", "train.micro_batch_size=2", f"train.max_steps={STEPS}", "optim.warmup_steps=2",
       "output.export=false", "checkpoint.keep_last=2"]
TIMEOUT = 120

pytestmark = pytest.mark.slow


def _command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "trainer.cli", "train", "tiny-moe", *JOB, *overrides, f"output.dir={run_dir}",
            "--no-progress"]


def _env(**faults: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **faults)


def _run(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(run_dir, *overrides), env=_env(), cwd=REPO, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def _latest(run_dir: Path) -> str | None:
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text() if pointer.exists() else None


class _Process:
    """A training process started with fault-injection variables; always killed when the test leaves."""

    def __init__(self, run_dir: Path, *overrides: str, **faults: str):
        self.popen = subprocess.Popen(_command(run_dir, *overrides), env=_env(**faults), cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_for_line(self, marker: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        for line in self.popen.stdout:
            if marker in line:
                return
            assert time.monotonic() < deadline, f"no '{marker}' in time"
        raise AssertionError(f"the process ended (code {self.popen.wait()}) before printing '{marker}'")

    def wait_until(self, condition) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            assert self.popen.poll() is None, "the process ended before the point the test waits for"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)

    def finish(self) -> int:
        self.popen.communicate(timeout=TIMEOUT)
        return self.popen.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.communicate(timeout=30)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _run(run_dir, "checkpoint.every_steps=1")
    return run_dir


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[int, float]:
    losses = _losses(reference_run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _max_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.strip()), default=0)


def test_sigkill_during_a_save_and_at_random_moments_then_resume_auto_reproduces_every_step(tmp_path, reference):
    run_dir = tmp_path / "run"
    with _Process(run_dir, "checkpoint.every_steps=1", MOE_FAULT_HANG_DURING_SAVE="2") as process:
        process.wait_for_line("hanging while saving checkpoint 2")
        partial = run_dir / "checkpoints" / ".tmp-step_00000002"
        assert any(partial.iterdir())  # shards are on disk, the checkpoint is not complete
        assert _latest(run_dir) == "step_00000001"
        process.popen.send_signal(signal.SIGKILL)
        assert process.finish() == -signal.SIGKILL

    kill_points = sorted(random.Random(7).sample(range(3, STEPS - 1), 3))  # seeded "random" steps, in order
    for kill_after in kill_points:
        with _Process(run_dir, "checkpoint.every_steps=1") as process:
            # Kill as soon as this step's metrics line is out: the next step (or this step's save) is running.
            process.wait_until(lambda: _max_step(run_dir) >= kill_after)
            process.popen.send_signal(signal.SIGKILL)
            assert process.finish() == -signal.SIGKILL
        assert not partial.exists()  # the stale temporary was cleared by the first resume
        assert _latest(run_dir) is not None

    resumed = _run(run_dir, "checkpoint.every_steps=1")
    assert "resumed from" in resumed.stdout
    assert _losses(run_dir) == reference  # exact: same data order, weights, optimizer and schedule state


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_checkpoints_at_the_step_boundary_exits_0_and_resumes_exactly(tmp_path, reference, signum):
    run_dir = tmp_path / "run"
    with _Process(run_dir, "checkpoint.every_steps=0", MOE_FAULT_PAUSE_AFTER_STEP="3") as process:
        process.wait_for_line("paused after step 3")
        process.popen.send_signal(signum)
        out, _ = process.popen.communicate(timeout=TIMEOUT)
        assert process.popen.returncode == 0, out[-2000:]
    assert f"stopped by {signal.Signals(signum).name} at step 3" in out
    assert _latest(run_dir) == "step_00000003"
    assert not (run_dir / "export").exists()

    _run(run_dir, "checkpoint.every_steps=0")
    assert _losses(run_dir) == reference


def test_a_second_sigterm_stops_at_once_even_in_the_middle_of_the_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    faults = {"MOE_FAULT_PAUSE_AFTER_STEP": "2", "MOE_FAULT_HANG_DURING_SAVE": "2"}
    with _Process(run_dir, "checkpoint.every_steps=0", **faults) as process:
        process.wait_for_line("paused after step 2")
        process.popen.send_signal(signal.SIGTERM)
        process.wait_for_line("hanging while saving checkpoint 2")  # the first signal's checkpoint, stuck
        process.popen.send_signal(signal.SIGTERM)
        assert process.finish() == -signal.SIGTERM
    assert _latest(run_dir) is None  # that checkpoint never completed; nothing claims it did


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_second_trainer_in_the_directory_of_a_running_one_is_refused_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with _Process(run_dir, "checkpoint.every_steps=1", MOE_FAULT_PAUSE_AFTER_STEP="2") as first:
        first.wait_for_line("paused after step 2")
        before = _files(run_dir)
        second = subprocess.run(_command(run_dir, "checkpoint.every_steps=1"), env=_env(), cwd=REPO,
                                capture_output=True, text=True, timeout=TIMEOUT)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert second.stderr.strip().startswith("error: output.dir") and "is in use by another trainer" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert _files(run_dir) == before
        first.popen.send_signal(signal.SIGTERM)
        assert first.finish() == 0


def test_a_kill_while_an_export_is_swapped_in_keeps_the_previous_export(tmp_path, reference_run):
    out = tmp_path / "export"
    export = [sys.executable, "-m", "trainer.cli", "export", str(reference_run / f"checkpoints/step_{STEPS - 1:08d}"), str(out)]
    assert subprocess.run(export, env=_env(), cwd=REPO, capture_output=True, timeout=TIMEOUT).returncode == 0
    previous = _files(out)
    latest = [*export[:4], str(reference_run), str(out), "--overwrite"]
    killed = subprocess.Popen(latest, env=_env(MOE_FAULT_HANG_DURING_EXPORT="1"), cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        for line in killed.stdout:
            if "hanging before the export swap" in line:
                break
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=TIMEOUT)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == -signal.SIGKILL
    assert _files(out) == previous  # the new export was complete next to it, never half in place

    assert subprocess.run(latest, env=_env(), cwd=REPO, capture_output=True, timeout=TIMEOUT).returncode == 0
    assert _files(out) != previous and not (tmp_path / ".tmp-export").exists()
