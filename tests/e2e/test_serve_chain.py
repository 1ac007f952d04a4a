"""The CPU chain end to end: tiny train -> export -> a real `transformers serve` on 127.0.0.1 -> eval client.

This is the product's promise in miniature: the served export reproduces transformers' greedy decoding token for
token (exact-match 1.0), checked by the same `python -m eval validate` the compose chain runs.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chain_env import REPO, free_port, offline_env
MISSING = [m for m in ("fastapi", "uvicorn", "openai", "accelerate") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(MISSING), reason=f"transformers serve needs {', '.join(MISSING)} (the test extra lists them)"),
]


def _moe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=cwd, env=offline_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    """A trained tiny export from `moe train` + `moe export`; a random tiny export while those are not in the tree."""
    work = tmp_path_factory.mktemp("chain")
    if importlib.util.find_spec("trainer.train") is None or importlib.util.find_spec("trainer.commands.export") is None:
        from eval.tiny import write_tiny_export

        return write_tiny_export(work / "export")
    run = work / "run"
    trained = _moe("train", "tiny-moe", "train.max_steps=4", "checkpoint.every_steps=4", f"output.dir={run}",
                   "output.export=false", "--no-progress", cwd=work)
    assert trained.returncode == 0, trained.stderr[-2000:]
    exported = _moe("export", str(run), str(work / "export"), cwd=work)
    assert exported.returncode == 0, exported.stderr[-2000:]
    return work / "export"


@pytest.fixture(scope="module")
def server(export_dir):
    """`python -m eval serve` (transformers serve) on a free loopback port; yields its base URL."""
    port = free_port()
    log = open(export_dir.parent / "serve.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "eval", "serve", "--export", str(export_dir), "--port", str(port)],
        cwd=REPO, env=offline_env(), stdout=log, stderr=subprocess.STDOUT,
    )
    yield f"http://127.0.0.1:{port}", process
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def _validate(export_dir: Path, base_url: str, report: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "eval", "validate", "--export", str(export_dir), "--base-url", base_url,
         "--report", str(report), "--timeout", "180", *extra],
        cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=600,
    )


@pytest.fixture()
def quick(tmp_path) -> list[str]:
    """Arguments for a shorter run (fewer tokens, a two-item task) where the full set adds nothing."""
    task = tmp_path / "task.jsonl"
    rows = [{"question": "Two plus two equals", "choices": ["four", "five"], "answer": 0},
            {"question": "Bees make", "choices": ["milk", "honey"], "answer": 1}]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--max-tokens", "8", "--task", str(task)]


def test_served_export_reproduces_transformers_greedy_decoding_exactly(export_dir, server, tmp_path):
    base_url, process = server
    result = _validate(export_dir, base_url, tmp_path / "report.json")
    assert process.poll() is None, (export_dir.parent / "serve.log").read_text()[-3000:]
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]

    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is True
    assert report["greedy"]["exact_match_rate"] == 1.0
    assert report["greedy"]["prompts"] >= 5
    assert any(item["reference"] for item in report["greedy"]["items"]), "every generation was empty"
    # transformers serve answers /v1/completions but returns no logprobs: those checks are skipped, not failed.
    assert report["server"]["api"] == "completions"
    assert report["server"]["logprobs"] is False
    skipped = {c["name"] for c in report["checks"] if c["passed"] is None}
    assert skipped == {"logprobs", "mc_agreement"}
    assert 0.0 <= report["multiple_choice"]["local_accuracy"] <= 1.0
    assert "validate PASSED" in result.stdout


def test_chat_endpoint_reproduces_the_chat_template_generation(export_dir, server, tmp_path, quick):
    base_url, _ = server
    result = _validate(export_dir, base_url, tmp_path / "report.json", "--api", "chat", *quick)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["server"]["api"] == "chat"
    assert report["greedy"]["exact_match_rate"] == 1.0


def test_validating_a_different_export_than_the_served_one_fails_with_the_first_divergence(
    export_dir, server, tmp_path, quick
):
    from eval.tiny import write_tiny_export

    other = write_tiny_export(tmp_path / "other", seed=123)
    base_url, _ = server
    result = _validate(other, base_url, tmp_path / "report.json", *quick)
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] is False
    assert report["greedy"]["exact_match_rate"] < 1.0
    assert "first divergence" in result.stdout


def test_serve_helper_refuses_a_port_in_use_in_one_line(export_dir, server):
    base_url = server[0]
    port = base_url.rsplit(":", 1)[1]
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "eval", "serve", "--export", str(export_dir), "--port", port],
                            cwd=REPO, env=offline_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert f"port {port}" in result.stderr and "in use" in result.stderr
    assert time.monotonic() - started < 60
