"""Two torchrun agents on one machine ("nodes", c10d rendezvous on 127.0.0.1) train the tiny model with EP=2
through `moe train`, checkpoint, and a second launch of both agents resumes from that checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness import free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


def _launch_two_nodes(run_dir: Path, max_steps: int, timeout: float = 240) -> list[str]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    agents = []
    for node_rank in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                   "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                   "--rdzv-id", f"two-node-{port}", "-m", "trainer.cli", "train", "tiny-moe",
                   "data.seq_len=64", "train.micro_batch_size=2", f"train.max_steps={max_steps}",
                   "checkpoint.every_steps=2", "output.export=false", f"output.dir={run_dir}",
                   "parallel.ep_size=2", "--no-progress"]
        agents.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, start_new_session=True))
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=timeout)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
    for agent, output in zip(agents, outputs):
        assert agent.returncode == 0, output[-3000:]
    return outputs


def test_two_agents_with_c10d_rendezvous_train_with_ep2_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    _launch_two_nodes(run_dir, max_steps=2)
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()

    outputs = _launch_two_nodes(run_dir, max_steps=3)
    assert "resumed from" in "".join(outputs) and "at step 2" in "".join(outputs)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (run_dir / "checkpoints" / "step_00000003").is_dir()
