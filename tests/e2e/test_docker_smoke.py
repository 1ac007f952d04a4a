"""The real images end to end through the Docker SDK: train -> export -> vLLM serve -> validate on a GPU host.

Skipped unless a Docker engine with an NVIDIA runtime answers. Building the trainer image compiles
TransformerEngine, DeepEP and the mamba kernels (an hour or more); point MOE_TRAINER_IMAGE / MOE_SERVE_IMAGE at
images built by `make images` to skip the builds. Run on a GPU host:
    pytest -q tests/e2e/test_docker_smoke.py
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Not marked `gpu`: the GPU belongs to the engine, the test process itself may run a CPU-only torch.
pytestmark = [pytest.mark.slow]


def _engine_with_gpu():
    """(client, None) when an engine with an NVIDIA runtime answers, else (None, why not)."""
    try:
        import docker
    except ImportError:
        return None, "the docker SDK is not installed"
    try:
        client = docker.from_env(timeout=10)
        client.ping()
        info = client.info()
    except Exception as err:  # noqa: BLE001 - any failure here means "no engine"
        return None, f"no Docker engine reachable ({type(err).__name__})"
    if "nvidia" not in (info.get("Runtimes") or {}) and not os.environ.get("MOE_SMOKE_FORCE_GPU"):
        return None, "the Docker engine has no NVIDIA runtime (no GPU for containers)"
    return client, None


CLIENT, WHY_NOT = _engine_with_gpu()
if CLIENT is None:
    pytestmark.append(pytest.mark.skip(reason=f"docker smoke test: {WHY_NOT}"))


def _image(env: str, dockerfile: str, tag: str) -> str:
    if os.environ.get(env):
        return os.environ[env]
    CLIENT.images.build(path=str(REPO), dockerfile=dockerfile, tag=tag, rm=True)
    return tag


def _run(image: str, command: list[str], volume: str, network: str, gpus: bool = True, **kwargs) -> str:
    """Run one step to completion; return its log. Fails the test with the log tail on a non-zero exit."""
    from docker.types import DeviceRequest, Ulimit

    container = CLIENT.containers.run(
        image, command, detach=True, network=network, volumes={volume: {"bind": "/runs", "mode": "rw"}},
        device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])] if gpus else None,
        ipc_mode="host", ulimits=[Ulimit(name="memlock", soft=-1, hard=-1)], **kwargs,
    )
    try:
        status = container.wait(timeout=3600)
        log = container.logs().decode(errors="replace")
        assert status["StatusCode"] == 0, f"{' '.join(command)} exited {status['StatusCode']}:\n{log[-4000:]}"
        return log
    finally:
        container.remove(force=True)


def test_the_chain_serves_the_trained_export_and_validates_it():
    from docker.types import DeviceRequest

    trainer = _image("MOE_TRAINER_IMAGE", "Dockerfile", "moe-stack/trainer:smoke")
    serve_image = _image("MOE_SERVE_IMAGE", "docker/serve.Dockerfile", "moe-stack/serve:smoke")
    suffix = uuid.uuid4().hex[:8]
    volume = CLIENT.volumes.create(f"moe-smoke-runs-{suffix}")
    network = CLIENT.networks.create(f"moe-smoke-{suffix}")
    server = None
    try:
        _run(trainer, ["moe", "train", "tiny-moe", "output.dir=/runs/tiny-moe", "output.export=false",
                       "train.max_steps=20", "--no-progress"], volume.name, network.name)
        _run(trainer, ["moe", "export", "/runs/tiny-moe", "/runs/tiny-moe/export", "--overwrite"],
             volume.name, network.name, gpus=False)
        server = CLIENT.containers.run(
            serve_image, detach=True, name=f"serve-{suffix}", network=network.name,
            volumes={volume.name: {"bind": "/runs", "mode": "ro"}},
            environment={"MODEL_DIR": "/runs/tiny-moe/export", "VLLM_EXTRA_ARGS": "--gpu-memory-utilization 0.3"},
            device_requests=[DeviceRequest(count=-1, capabilities=[["gpu"]])], ipc_mode="host",
        )
        log = _run(trainer, ["python", "-m", "eval", "validate", "--export", "/runs/tiny-moe/export",
                             "--base-url", f"http://serve-{suffix}:8000", "--model", "moe-export",
                             "--report", "/runs/tiny-moe/validate.json", "--timeout", "900"],
                   volume.name, network.name)
        assert "validate PASSED" in log
    finally:
        if server is not None:
            server.remove(force=True)
        network.remove()
        time.sleep(1)
        volume.remove(force=True)
