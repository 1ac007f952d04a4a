"""Replication (`trainer.parallel.replicate`): two gloo processes, each on half of the batch, with gradients averaged
inside the backward by the in-backward optimizer, train exactly like one process on the whole batch; also with the
optimizer sharded (each rank updates half of each parameter, then the halves are all-gathered); also with the
experts split between the ranks (each keeps and updates half of every MoE layer's experts, tokens sent to them by
all-to-all).

Tolerance: 1e-5 relative per parameter after 3 steps in float32 (the average of two half-batch gradients vs the
whole-batch gradient: summation order only). Both replicas end bit-identical.
"""

from __future__ import annotations

import pytest

import replicate_workers
from harness import run_ranks

pytestmark = [pytest.mark.distributed]

IN_BACKWARD, OVERLAP = ("optimizer=in-backward",), ("optimizer=overlap",)
DEFER_ONE = IN_BACKWARD + ("defer=1",)
FUSED_OVERLAP = ("fused_experts=on",) + OVERLAP


def _name(value) -> str:
    return "+".join(value) if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize("spec", [IN_BACKWARD, OVERLAP, ("fused_experts=on",) + IN_BACKWARD, DEFER_ONE], ids=_name)
def test_two_replicas_train_like_one_process_on_the_whole_batch(spec):
    results = run_ranks(replicate_workers.replicas_train_like_one_process, 2, spec, timeout=120)
    assert results[0]["checksum"] == results[1]["checksum"], "the replicas drifted apart"
    assert results[0]["grads_left"] == 0
    assert results[0]["moved"] > 1e-3, "the parameters should have been trained"
    assert results[0]["worst_rel"] <= 1e-5, f"parameters differ by {results[0]['worst_rel']:.2e}"


@pytest.mark.parametrize("spec", [IN_BACKWARD, OVERLAP, DEFER_ONE], ids=_name)
def test_replicas_with_a_sharded_optimizer_train_like_one_process_and_keep_half_the_state(spec):
    results = run_ranks(replicate_workers.replicas_train_like_one_process, 2, spec, 3, True, timeout=120)
    assert results[0]["checksum"] == results[1]["checksum"], "the replicas drifted apart"
    assert results[0]["grads_left"] == 0
    assert results[0]["moved"] > 1e-3, "the parameters should have been trained"
    assert results[0]["worst_rel"] <= 1e-5, f"parameters differ by {results[0]['worst_rel']:.2e}"
    # every parameter of the tiny model divides by 2 except a few vectors: the state is about half
    assert results[0]["state_elements"] <= 0.55 * results[0]["param_elements"]


@pytest.mark.parametrize("spec,dispatcher", [(IN_BACKWARD, "alltoall"), (FUSED_OVERLAP, "alltoall"),
                                             (DEFER_ONE, "alltoall"), (FUSED_OVERLAP, "allgather"),
                                             (FUSED_OVERLAP + ("compile=layers",), "allgather")], ids=_name)
def test_replicas_with_split_experts_train_like_one_process_and_keep_their_experts_only(spec, dispatcher):
    results = run_ranks(replicate_workers.replicas_train_like_one_process, 2, spec, 3, True, True, dispatcher,
                        timeout=180)
    assert results[0]["dispatchers"] == [dispatcher]
    if "compile=layers" in spec:  # the all-gather path compiles whole: routing plan, collectives, expert MLP op
        assert results[0]["graph_breaks"] == 0 and any("torch.compile (layers)" in n for n in results[0]["notes"])
    assert results[0]["checksum"] == results[1]["checksum"], "the replicated parameters drifted apart"
    assert results[0]["grads_left"] == 0
    assert results[0]["moved"] > 1e-3, "the parameters should have been trained"
    assert results[0]["worst_rel"] <= 1e-5, f"parameters differ by {results[0]['worst_rel']:.2e}"
    # the experts hold most of the tiny model: each rank keeps state for half of them and half of the rest
    assert results[0]["state_elements"] <= 0.55 * results[0]["param_elements"]


def test_a_replicated_model_refuses_an_optimizer_that_does_not_average_gradients():
    messages = run_ranks(replicate_workers.replicated_model_refuses_an_optimizer_that_does_not_average, 2, timeout=60)
    assert all("needs the optimizer that averages its gradients" in m for m in messages)


def test_split_experts_needs_a_replicated_model():
    from replicate_workers import _model
    from trainer.parallel.replicate_experts import split_experts

    with pytest.raises(RuntimeError, match="needs a replicated model"):
        split_experts(_model(seed=0))
