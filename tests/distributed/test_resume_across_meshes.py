"""A DCP checkpoint written under EP=2 resumes under another mesh of the same world size (FSDP only, EP=1) with
identical weights and optimizer state; a different world size is refused with a one-line error."""

from __future__ import annotations

import pytest

import ep_workers
from harness import run_ranks
from trainer.errors import UserError
from trainer.parallel.resume import check_resume_world_size, saved_world_size

pytestmark = pytest.mark.distributed


def test_ep2_checkpoint_resumes_under_fsdp_only_and_under_ep2_and_refuses_another_world_size(tmp_path):
    results = run_ranks(ep_workers.dcp_reshard, 2, str(tmp_path / "ckpt"))
    for per_rank in results:
        assert per_rank == {"ep1": True, "ep2": True}

    assert saved_world_size(tmp_path / "ckpt") == 2
    check_resume_world_size(tmp_path / "ckpt", 2)
    with pytest.raises(UserError, match="written by 2 processes but this run has 4; relaunch with 2 processes"):
        check_resume_world_size(tmp_path / "ckpt", 4)
