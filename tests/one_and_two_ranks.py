"""Train the same recipe twice, as the tests of data parallelism compare it: one process with 2 accumulation steps,
and 2 gloo ranks under torchrun (FSDP2), so that both see the same rows per optimizer step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def two_ranks_command(recipe: str, overrides: list[str]) -> list[str]:
    """`moe train recipe overrides` on 2 local ranks under torchrun."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return [*launcher, "-m", "trainer.cli", "train", recipe, *overrides]


def train_one_process_and_two_ranks(out: Path, recipe: str, overrides: list[str], timeout: float = 300) -> None:
    """`moe train recipe overrides` into out/one (one process, train.grad_accum_steps=2) and out/two (2 ranks)."""
    env = train_env()
    subprocess.run([sys.executable, "-m", "trainer.cli", "train", recipe, *overrides, f"output.dir={out / 'one'}",
                    "train.grad_accum_steps=2"], cwd=REPO, env=env, check=True, capture_output=True, timeout=timeout)
    # A new session so that on a timeout the launcher and both workers are killed together.
    two = subprocess.Popen([*two_ranks_command(recipe, overrides), f"output.dir={out / 'two'}"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = two.communicate(timeout=timeout)
    finally:
        if two.poll() is None:
            os.killpg(two.pid, signal.SIGKILL)
    assert two.returncode == 0, output[-3000:]
