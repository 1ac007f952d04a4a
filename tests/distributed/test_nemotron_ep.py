"""Nemotron-H with expert parallelism (EP=2) + FSDP2 on two gloo processes trains like one process.

Each rank trains on its half of a packed global batch (positions restart per sample, so the Mamba2 layers get
seq_idx); the single-process model trains on the whole batch. Steps: random routing, then a step where every token
picks experts 0 and 1 (rank 1's experts receive nothing yet still join every collective). Tolerance: 1e-5 relative
in float32 for losses and every gathered gradient (summation order only: the K-way combine is split into a per-rank
partial sum and a sum over ranks).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import tiny_configs
from harness import run_ranks

STEPS = ["random", "few_experts"]
TOL = 1e-5
ROWS_PER_RANK = 2
SAMPLE_LENGTHS = [5, 7, 4]  # one packed row of 16 tokens

pytestmark = pytest.mark.distributed


def _random_model():
    from trainer.models import MoEAutoModelForCausalLM

    torch.manual_seed(0)
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.nemotron_h())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not any(part in name for part in ("norm", "A_log", "dt_bias")):
                param.normal_(std=0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(std=0.1)
    return model


def _first_two_experts(module, inputs, output):
    logits, weights, index = output
    return logits, weights, torch.stack([torch.zeros_like(index[:, 0]), torch.ones_like(index[:, 1])], dim=1)


def nemotron_ep_parity(parallel: dict, steps: list[str]) -> dict:
    from ep_workers import compare_step

    from trainer.parallel import ParallelConfig, parallelize

    world = dist.get_world_size()
    reference = _random_model()
    sharded = parallelize(copy.deepcopy(reference), ParallelConfig(**parallel, param_dtype=None))
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    opt_sharded = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    positions = torch.cat([torch.arange(n) for n in SAMPLE_LENGTHS]).expand(world * ROWS_PER_RANK, -1)
    losses, worst_grad = [], 0.0
    for step, kind in enumerate(steps):
        handles = []
        if kind == "few_experts":
            for model in (reference, sharded):
                routers = [m for m in model.modules() if type(m).__name__ == "NemotronHTopkRouter"]
                handles += [r.register_forward_hook(_first_two_experts) for r in routers]
        ids = torch.randint(0, tiny_configs.VOCAB, positions.shape, generator=torch.Generator().manual_seed(step))
        step_losses, step_worst = compare_step(reference, sharded, ids, position_ids=positions)
        losses.append(step_losses)
        worst_grad = max(worst_grad, step_worst)
        for handle in handles:
            handle.remove()
        for optimizer in (opt_ref, opt_sharded):
            optimizer.step()
            optimizer.zero_grad()
    experts = [m for m in sharded.modules() if type(m).__name__.endswith("NemotronHExperts")]  # FSDP renames
    local_experts = [_local_rows(m.up_proj) for m in experts]
    return {"losses": losses, "worst_grad_rel": worst_grad, "local_experts": local_experts}


def _local_rows(param) -> int:
    local = param.to_local() if hasattr(param, "to_local") else param
    return local.shape[0]


def test_ep2_on_two_processes_matches_one_process():
    results = run_ranks(nemotron_ep_parity, 2, {"ep_size": 2}, STEPS, timeout=150)
    for result in results:
        assert result["local_experts"] == [4, 4]  # 8 experts per MoE layer, split over two ranks
        for step, (reference, sharded) in zip(STEPS, result["losses"]):
            assert abs(sharded - reference) <= TOL * abs(reference), f"step '{step}': {sharded} vs {reference}"
        assert result["worst_grad_rel"] <= TOL, f"gradient differs by {result['worst_grad_rel']:.2e}"


def test_ep2_sharded_load_computes_the_same_loss_and_exports_the_same_bytes(tmp_path):
    import json

    import ep_workers
    from checkpoint_files import file_bytes as _files
    from checkpoint_files import save_single_process_exports

    save_single_process_exports(tiny_configs.nemotron_h(), str(tmp_path))

    results = run_ranks(ep_workers.export_matches_single_process, 2, str(tmp_path), {"ep_size": 2}, timeout=150)

    for result in results:
        assert result["loss"] == pytest.approx(result["ref_loss"], rel=1e-6)
    assert _files(tmp_path / "sharded") == _files(tmp_path / "single")
    assert _files(tmp_path / "sharded_single_file") == _files(tmp_path / "single_file")
    config = json.loads(_files(tmp_path / "sharded")["config.json"])
    assert config["hybrid_override_pattern"] == "ME*-EM" and "layers_block_type" not in config
