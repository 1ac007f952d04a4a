"""On 2+ GPUs with DeepEP built: DeepEP dispatch/combine equals the all-to-all dispatcher bit for bit in the forward
pass and within bf16 tolerance in the backward, at the Qwen3-30B-A3B layer shape (runs bench/ep_dispatch.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
    pytest.mark.skipif(importlib.util.find_spec("deep_ep") is None, reason="needs DeepEP (bench/device/build_deepep.sh)"),
]


def test_deepep_matches_alltoall_forward_bit_for_bit_and_backward_within_bf16(tmp_path):
    out = tmp_path / "ep_dispatch.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "bench" / "ep_dispatch.py"), "--iters", "3", "--warmup", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    checks = json.loads(out.read_text())["checks"]
    assert checks["forward_bit_identical"], checks
    assert checks["backward_within_bf16_tolerance"], checks
