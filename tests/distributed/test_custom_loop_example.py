"""examples/custom_loop.py under torchrun (2 processes, gloo): loads sharded, trains, and its save_pretrained
writes a checkpoint that plain transformers loads."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_configs

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


def test_custom_loop_example_trains_sharded_and_saves_a_standard_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(copy.deepcopy(tiny_configs.qwen3_moe())).save_pretrained(tmp_path / "base")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "examples" / "custom_loop.py"), str(tmp_path / "base"), "--ep-size", "2",
               "--steps", "2", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "step 1: loss" in done.stdout

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert any("experts" in n for n in changed) and any("self_attn" in n for n in changed)
