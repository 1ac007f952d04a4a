"""LoRA under FSDP2 (2 processes, gloo, CPU fp32, tiny Qwen3-MoE random init) trains, resumes and exports as one
process does on the same global batch (one process: micro-batch 2 x 2 accumulation steps; two: micro-batch 2 each).

Tolerances: losses 1e-5 relative (FSDP2's reduce-scatter sums the two ranks' gradients in another order than
accumulation does: float32 rounding only); resume from step 2 of the 2-process run reproduces its steps 3-4 within
1e-6 relative; the base weights are bit-identical after training; the exported adapter loaded by PEFT on plain
transformers, and the merged export, give the single-process export's logits within 1e-5, as does `moe export` of
the 2-process checkpoint in one process. Measured (torch 2.13, CPU):
losses equal, resume equal, logits max-abs 6.3e-7 (PEFT-loaded adapter) and 6.0e-7 (merged); base bit-identical.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lora_workers
from harness import run_ranks
from parity_checks import worst_relative
from trainer.checkpoint.export_run import export_checkpoint
from trainer.lora.run import BASE_WEIGHTS
from trainer.train import train

pytestmark = pytest.mark.distributed
LOSS_TOL, RESUME_TOL, LOGITS_TOL = 1e-5, 1e-6, 1e-5


def _plain_base(run_dir):
    """Plain transformers model (no moe_fast, no adapters) with the base weights the run saved."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run_dir / "hf"), dtype=torch.float32)
    model.load_state_dict(load_file(str(run_dir / "hf" / BASE_WEIGHTS)), strict=False)
    return model.eval()


def _logits(model):
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_on_two_fsdp_ranks_trains_resumes_and_exports_like_one_process(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    results = run_ranks(lora_workers.train_resume_and_check_base, 2, str(tmp_path), timeout=180)
    one = train(lora_workers.lora_recipe(tmp_path / "one", "train.grad_accum_steps=2"), progress=False)
    first = results[0]
    assert first["sharded"] and first["trainable"] and all(".lora_" in n for n in first["trainable"])
    assert [r["losses"] for r in results] == [first["losses"]] * 2  # every rank reports the same mean loss

    # (a) same losses as one process; the base is untouched and equal to the single process's base
    assert len(first["losses"]) == len(one.losses) == 4
    worst = worst_relative(first["losses"], one.losses)
    assert worst <= LOSS_TOL, (first["losses"], one.losses)
    assert first["base_unchanged"]
    base_one, base_two = load_file(str(tmp_path / "one/hf" / BASE_WEIGHTS)), load_file(str(tmp_path / "two/hf" / BASE_WEIGHTS))
    assert sorted(base_one) == sorted(base_two) and all(torch.equal(base_one[k], base_two[k]) for k in base_one)

    # (b) resume from the 2-process checkpoint at step 2 reproduces steps 3 and 4
    assert len(first["resumed"]) == 2
    assert worst_relative(first["resumed"], first["losses"][2:]) <= RESUME_TOL

    # (c) the adapter (PEFT's files, gathered by rank 0) loads with PEFT and gives the single-process export's
    # logits; so does the merged export
    config = json.loads((tmp_path / "two/export-adapter/adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_parameters"]
    adapters_one = load_file(str(tmp_path / "one/export-adapter/adapter_model.safetensors"))
    adapters_two = load_file(str(tmp_path / "two/export-adapter/adapter_model.safetensors"))
    assert sorted(adapters_one) == sorted(adapters_two)
    reference = _logits(PeftModel.from_pretrained(_plain_base(tmp_path / "one"), str(tmp_path / "one/export-adapter")))
    sharded = _logits(PeftModel.from_pretrained(_plain_base(tmp_path / "two"), str(tmp_path / "two/export-adapter")))
    assert (sharded - reference).abs().max().item() <= LOGITS_TOL
    merged = _logits(AutoModelForCausalLM.from_pretrained(str(tmp_path / "two/export"), dtype=torch.float32).eval())
    assert (merged - reference).abs().max().item() <= LOGITS_TOL

    # `moe export` in one process from the 2-process checkpoint (DCP reads the two ranks' adapter shards)
    out, step = export_checkpoint(tmp_path / "two", tmp_path / "out", "float32")
    assert step == 4
    exported = _logits(PeftModel.from_pretrained(_plain_base(tmp_path / "two"), str(tmp_path / "out-adapter")))
    assert (exported - sharded).abs().max().item() <= LOGITS_TOL


def test_lora_with_expert_parallelism_and_activation_checkpointing_on_two_ranks_matches_one_process(tmp_path):
    """ep_size=2: each rank holds half the experts and computes their adapters' slice (all-to-all and all-gather
    dispatchers, and all-to-all with the MoE block recomputed); FSDP2 alone with every layer recomputed; the EP=2
    checkpoint resumed under FSDP2 alone. Same tolerances as above (the resume across layouts within the loss
    tolerance); the exported adapter of the all-to-all run against one process's. Measured (torch 2.13):
    losses equal, logits max-abs 6.4e-7 (all-to-all)."""
    from peft import PeftModel

    layouts = [["parallel.ep_size=2", "parallel.dispatcher=alltoall"],
               ["parallel.ep_size=2", "parallel.dispatcher=allgather", "output.export=false"],
               ["parallel.ep_size=2", "parallel.activation_checkpointing=moe", "output.export=false"],
               ["parallel.activation_checkpointing=full", "output.export=false"]]
    resume_under = ["parallel.ep_size=1", "output.export=false"]
    results = run_ranks(lora_workers.train_layouts, 2, str(tmp_path / "ep"), layouts, resume_under, timeout=240)
    one = train(lora_workers.lora_recipe(tmp_path / "one", "train.grad_accum_steps=2"), progress=False)
    # the EP=2 checkpoint at step 2 resumes under FSDP2 alone (same world size): the same steps 3 and 4
    resumed = results[0][-1]["losses"]
    assert len(resumed) == 2 and worst_relative(resumed, results[0][0]["losses"][2:]) <= LOSS_TOL
    for layout, result in zip(layouts, results[0]):
        assert result["expert_sharded"] == ("parallel.ep_size=2" in layout), layout
        worst = worst_relative(result["losses"], one.losses)
        assert len(result["losses"]) == 4 and worst <= LOSS_TOL, (layout, result["losses"], one.losses)
    reference = _logits(PeftModel.from_pretrained(_plain_base(tmp_path / "one"), str(tmp_path / "one/export-adapter")))
    sharded = _logits(PeftModel.from_pretrained(_plain_base(tmp_path / "ep/0"), str(tmp_path / "ep/0/export-adapter")))
    assert (sharded - reference).abs().max().item() <= LOGITS_TOL
