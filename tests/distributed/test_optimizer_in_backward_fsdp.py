"""trainer.optim.AdamW on FSDP2-sharded parameters, FSDP-only and EP=2 + FSDP2, 2 gloo processes, 3 steps: the same
parameters as torch's AdamW after the backward.
- in the backward (`perf.optimizer=in-backward`): FSDP2 calls each sharded parameter's post-accumulate-grad hook
  after its reduce-scatter, so the update runs there and no gradient is left at the end of the backward;
- after the backward (the default): its `step()` updates each sharded parameter through its local shard.
Tolerance: 1e-6 relative in float32 (the same AdamW formula, torch's fused kernel per shard against its foreach one).
"""

from __future__ import annotations

import pytest

import ep_workers
from harness import run_ranks
from trainer.optim import fsdp_fires_grad_hooks

pytestmark = [pytest.mark.distributed]


@pytest.mark.skipif(not fsdp_fires_grad_hooks(), reason="this torch's FSDP2 calls no grad hooks")
@pytest.mark.parametrize("parallel", [{"ep_size": 1}, {"ep_size": 2}], ids=["fsdp", "ep2"])
def test_optimizer_in_backward_on_fsdp2_equals_the_step_after_backward(parallel):
    for result in run_ranks(ep_workers.optimizer_in_backward_matches, 2, parallel, timeout=120):
        assert result["notes"] == [], result["notes"]
        assert result["grads_left"] == 0, "every sharded gradient should be consumed and freed in the backward"
        assert result["moved"] > 1e-4, "the parameters should have been trained"
        assert result["worst_rel"] <= 1e-6, f"parameters differ by {result['worst_rel']:.2e}"


@pytest.mark.parametrize("parallel", [{"ep_size": 1}, {"ep_size": 2}], ids=["fsdp", "ep2"])
def test_optimizer_after_backward_updates_sharded_parameters_like_torchs_adamw(parallel):
    for result in run_ranks(ep_workers.optimizer_in_backward_matches, 2, parallel, 3, ("optimizer=after-backward",),
                            timeout=120):
        assert result["moved"] > 1e-4, "the sharded parameters should have been trained by step()"
        assert result["worst_rel"] <= 1e-6, f"parameters differ by {result['worst_rel']:.2e}"
