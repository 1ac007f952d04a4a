"""The launch files are valid and parameterised by MODEL, nodes and GPUs per node."""

from __future__ import annotations

import string
import subprocess
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
VALUES = {"MODEL": "qwen3-30b-a3b", "NODES": "4", "WORKERS": "3", "GPUS_PER_NODE": "8", "IMAGE": "moe-stack/trainer:0.1.0"}


def _render(name: str) -> dict:
    return yaml.safe_load(string.Template((DEPLOY / "k8s" / name).read_text()).substitute(VALUES))


def test_slurm_script_parses_forwards_sigusr1_and_launches_torchrun_with_c10d():
    script = DEPLOY / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --signal=B:USR1@" in text and "trap forward_preemption USR1" in text
    assert "--rdzv-backend c10d" in text and 'MODEL="${MODEL:-tiny-moe}"' in text


def test_trainjob_runs_the_model_on_the_requested_nodes_and_gpus():
    job = _render("trainjob.yaml")
    trainer = job["spec"]["trainer"]
    assert job["kind"] == "TrainJob" and job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert (trainer["numNodes"], trainer["numProcPerNode"]) == (4, 8)
    assert trainer["args"][:4] == ["-m", "trainer.cli", "train", "qwen3-30b-a3b"]


def test_pytorchjob_has_one_master_and_nodes_minus_one_workers():
    job = _render("pytorchjob.yaml")
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"], job["spec"]["nprocPerNode"]) == (1, 3, "8")
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert "qwen3-30b-a3b" in container["command"] and container["resources"]["limits"]["nvidia.com/gpu"] == 8
