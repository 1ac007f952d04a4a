"""Data parallelism changes nothing but speed: 2 ranks (torchrun, gloo, FSDP2) x micro-batch 2 reproduce one
process with micro-batch 2 and 2 accumulation steps, loss for loss, write one sharded checkpoint and export the
same weights."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from one_and_two_ranks import REPO, train_env, train_one_process_and_two_ranks, two_ranks_command

COMMON = ["data.seq_len=96", "train.micro_batch_size=2", "train.max_steps=4", "output.export=true", "--no-progress"]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_two_ranks_match_one_process_with_gradient_accumulation(tmp_path):
    train_one_process_and_two_ranks(tmp_path, "tiny-moe", COMMON)
    # Same rows per step, same token-mean loss; FSDP2's reduce-scatter sums in another order than accumulation,
    # so later steps may differ by float32 rounding.
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    checkpoint = tmp_path / "two" / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # The final export of the sharded run is a standard checkpoint with the same weights as the one-process run.
    from transformers import AutoModelForCausalLM

    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "export").state_dict()
    two_state = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "export").state_dict()
    assert sorted(one) == sorted(two_state)
    for key in one:
        assert two_state[key].float().allclose(one[key].float(), rtol=1e-3, atol=1e-5), key
    # Each rank hashed its share of the files; meta.json records all of them, and a 2-rank resume verifies them
    # (each rank its share again) before it continues.
    recorded = json.loads((checkpoint / "meta.json").read_text())["files"]
    assert sorted(recorded) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    resumed = subprocess.run([*two_ranks_command("tiny-moe", COMMON), f"output.dir={tmp_path / 'two'}",
                              "train.max_steps=5"], cwd=REPO, env=train_env(), capture_output=True, text=True,
                             timeout=300, start_new_session=True)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:] + resumed.stderr[-3000:]
