"""`parallel.layout: replicate` through `moe train` (2 gloo processes, CPU fp32, tiny Qwen3-MoE random init): every
rank holds the whole model as plain tensors, the in-backward optimizer averages the gradients layer by layer and
each rank keeps the AdamW state of its rows only. It trains as one process does on the same global batch (micro-batch
2 x 2 accumulation steps, AdamW after the backward, no clipping: the same update), its checkpoints hold the AdamW
state in FSDP2's layout (each rank's rows of the parameter's shape), so they resume replicated and under FSDP2, and
its export loads in plain transformers.

Tolerances: losses 1e-5 relative (the average of two half-batch gradients vs accumulation: float32 summation order);
resumed steps 3-4 within 1e-5 relative of the straight run's (1e-6 in practice when replicated); export logits within
1e-5 of the single process's export. Both replicas end bit-identical (same code, same averaged gradients).
Measured (torch 2.13 and 2.7.1, CPU): losses 7.6e-8 relative, both resumes equal to the straight run (0.0), export
logits max-abs 7.7e-7.
"""

from __future__ import annotations

import pytest
import torch.distributed.checkpoint as dcp

import replicate_layout_workers as workers
from harness import run_ranks
from parity_checks import worst_relative
from trainer.errors import UserError
from trainer.train import train

pytestmark = pytest.mark.distributed
LOSS_TOL, LOGITS_TOL = 1e-5, 1e-5


def test_replicated_layout_trains_resumes_under_both_layouts_and_exports_like_one_process(tmp_path):
    results = run_ranks(workers.train_resume_under_both_layouts, 2, str(tmp_path), timeout=240)
    one = train(workers.recipe(tmp_path / "one", "train.grad_accum_steps=2"), progress=False)
    first = results[0]
    assert first["plain"], "a replicated model keeps plain tensors"
    assert results[1]["checksum"] == first["checksum"], "the replicas drifted apart"
    assert [r["losses"] for r in results] == [first["losses"]] * 2

    assert len(first["losses"]) == len(one.losses) == 4
    assert worst_relative(first["losses"], one.losses) <= LOSS_TOL, (first["losses"], one.losses)
    for resumed in ("resumed", "resumed_fsdp"):
        assert len(first[resumed]) == 2
        assert worst_relative(first[resumed], first["losses"][2:]) <= LOSS_TOL, (resumed, first)

    # the checkpoint holds each 2-D weight's AdamW moments as two row blocks (one per rank) of the weight's shape
    metadata = dcp.FileSystemReader(str(tmp_path / "two/checkpoints/step_00000004")).read_metadata()
    moments = {k: v for k, v in metadata.state_dict_metadata.items() if k.endswith("q_proj.weight.exp_avg")}
    assert moments, sorted(metadata.state_dict_metadata)[:10]
    for item in moments.values():
        assert len(item.chunks) == 2 and {c.offsets[0] for c in item.chunks} == {0, item.size[0] // 2}

    logits = workers.export_logits(str(tmp_path / "two/export"))
    reference = workers.export_logits(str(tmp_path / "one/export"))
    assert (logits - reference).abs().max().item() <= LOGITS_TOL


@pytest.mark.parametrize("overrides,named", [  # the missing in-backward optimizer: tests/unit/test_errors.py
    (["perf.optimizer=in-backward", "optim.max_grad_norm=0", "parallel.ep_size=2"], "parallel.ep_size=1"),
    (["perf.optimizer=in-backward", "optim.max_grad_norm=0", "lora.enabled=true"], "parallel.layout=fsdp"),
], ids=["ep", "lora"])
def test_a_replicated_layout_the_step_cannot_run_is_refused_when_the_recipe_loads(overrides, named):
    from trainer.config import load_recipe

    with pytest.raises(UserError) as err:
        load_recipe("tiny-moe", ["parallel.layout=replicate", *overrides])
    assert named in str(err.value)
