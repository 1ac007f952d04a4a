"""`make -n <target>` renders the container commands; without a Docker engine each target says so in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})


def rendered(*args: str) -> str:
    result = make("-n", *args)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.replace("\\\n", " ").split())  # one line, continuation lines joined


def test_train_runs_torchrun_in_the_train_service_with_the_preset_gpus_nodes_and_overrides():
    out = rendered("train", "MODEL=nemotron-3-nano", "GPUS=4", "NODES=2", "OVERRIDES=optim.lr=1e-5 train.max_steps=10")
    assert "docker compose --profile gpu run --rm train torchrun --nnodes 2 --nproc-per-node 4" in out
    assert ("-m trainer.cli train nemotron-3-nano output.dir=/runs/nemotron-3-nano output.export=false "
            "optim.lr=1e-5 train.max_steps=10") in out
    assert "MODEL=nemotron-3-nano" in out  # compose.yaml interpolates the same variables


def test_train_defaults_to_all_eight_gpus_of_one_node():
    assert "--nnodes 1 --nproc-per-node 8" in rendered("train", "MODEL=qwen3-30b-a3b")


def test_export_writes_the_runs_hugging_face_checkpoint_next_to_it():
    out = rendered("export", "MODEL=nemotron-3-nano")
    assert "run --rm --no-deps export moe export /runs/nemotron-3-nano /runs/nemotron-3-nano/export --overwrite" in out


def test_serve_starts_the_vllm_service_and_waits_for_health():
    out = rendered("serve", "MODEL=nemotron-3-nano", "PORT=9000")
    assert "PORT=9000" in out and "up --detach --no-deps --wait serve" in out


def test_validate_runs_the_eval_client_against_the_serve_service():
    out = rendered("validate", "MODEL=nemotron-3-nano")
    assert ("run --rm --no-deps validate python -m eval validate --export /runs/nemotron-3-nano/export "
            "--base-url http://serve:8000") in out
    assert "--report /runs/nemotron-3-nano/validate.json" in out


def test_smoke_runs_the_whole_chain_through_validate_and_stops_it():
    out = rendered("smoke")
    assert "--profile gpu build" in out and "--profile gpu run --rm validate;" in out and "stop" in out
    cpu = rendered("smoke", "PROFILE=cpu")
    assert "--profile cpu run --rm validate-cpu;" in cpu


def test_images_builds_the_trainer_and_the_serving_image():
    out = rendered("images", "IMAGE_TAG=9.9")
    assert "docker build -t moe-stack/trainer:9.9 -f Dockerfile ." in out
    assert "docker build -t moe-stack/serve:9.9 -f docker/serve.Dockerfile ." in out
    assert "docker build -t moe-stack/serve-cpu:9.9 -f docker/serve-cpu.Dockerfile ." in out


def test_help_lists_every_container_target():
    out = make("help").stdout
    for target in ("images", "train", "export", "serve", "validate", "smoke", "demo", "test"):
        assert f"  {target} " in out


@pytest.mark.parametrize("target", ["images", "train", "export", "serve", "validate", "smoke"])
def test_without_a_docker_engine_a_target_says_so_in_one_line_and_exits_2(target):
    result = make(target, "MODEL=nemotron-3-nano", DOCKER="/nonexistent/docker")
    assert f"make {target}: no Docker engine reachable" in result.stdout
    assert result.stdout.strip().count("\n") == 0
    assert "Traceback" not in result.stdout + result.stderr
    assert result.returncode == 2
