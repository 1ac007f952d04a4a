"""`moe doctor` and the trainer image's entrypoint: print the active backends, refuse to start without one the
image was built to have. Runs on the host here; in the image the same code runs as the entrypoint."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import backends
from trainer.cli import main

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
needs_no_deep_ep = pytest.mark.skipif(importlib.util.find_spec("deep_ep") is not None, reason="deep_ep is installed")


def test_doctor_lists_every_backend_with_a_one_line_detail(capsys):
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == list(backends.BACKENDS)


def test_doctor_json_reports_availability_per_backend(capsys):
    assert main(["doctor", "--json", "--require", "torch"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert set(table["backends"]) == set(backends.BACKENDS)
    assert table["backends"]["torch"]["required"] is True and table["missing_required"] == []


def test_every_check_returns_available_and_a_detail_line():
    for name in backends.BACKENDS:
        available, detail = backends.check(name)
        assert isinstance(available, bool) and detail and "\n" not in detail


@needs_no_deep_ep
def test_a_required_backend_that_is_not_installed_is_a_one_line_error(capsys):
    assert main(["doctor", "--require", "deepep,torch"]) == 2
    captured = capsys.readouterr()
    assert "MISSING deepep" in captured.out
    assert captured.err.count("\n") == 1 and "built to have deepep" in captured.err


@needs_no_deep_ep
def test_strict_mode_requires_what_the_image_declares(capsys, monkeypatch):
    monkeypatch.setenv("MOE_EXPECT_BACKENDS", "deepep")
    assert main(["doctor", "--strict"]) == 2
    monkeypatch.setenv("MOE_EXPECT_BACKENDS", "")
    assert main(["doctor", "--strict"]) == 0


def test_installed_gpu_backends_do_not_fail_on_a_host_without_a_gpu(capsys):
    # torch is installed; NCCL/grouped GEMM being inactive without a CUDA device is not a broken image.
    assert main(["doctor", "--require", "torch,nccl,grouped_mm"]) == 0


def test_an_unknown_backend_name_is_a_user_error(capsys):
    assert main(["doctor", "--require", "deepep2"]) == 2
    assert "unknown backend name(s) deepep2" in capsys.readouterr().err


@pytest.fixture()
def moe_on_path(tmp_path) -> dict:
    """An environment whose PATH has a `moe` that runs this checkout (as the image's console script does)."""
    shim = tmp_path / "bin" / "moe"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m trainer.cli "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "PYTHONPATH": str(REPO)}


def test_entrypoint_prints_the_table_on_stderr_then_runs_the_command(moe_on_path):
    env = {**moe_on_path, "MOE_EXPECT_BACKENDS": ""}
    result = subprocess.run(["bash", str(ENTRYPOINT), "echo", "ran"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ran\n"  # the command's stdout stays clean
    assert "grouped_mm" in result.stderr


@needs_no_deep_ep
def test_entrypoint_refuses_to_start_when_a_built_in_backend_is_missing(moe_on_path):
    env = {**moe_on_path, "MOE_EXPECT_BACKENDS": "deepep,te,mamba"}
    result = subprocess.run(["bash", str(ENTRYPOINT), "echo", "ran"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "ran" not in result.stdout
    assert "error: this image was built to have deepep, te, mamba" in result.stderr


def test_entrypoint_check_can_be_switched_off(moe_on_path):
    env = {**moe_on_path, "MOE_EXPECT_BACKENDS": "deepep", "MOE_DOCTOR": "0"}
    result = subprocess.run(["bash", str(ENTRYPOINT), "echo", "ran"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "ran\n" and result.stderr == ""
