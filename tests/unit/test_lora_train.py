"""`moe train` with lora.enabled=true on the tiny model: only adapters train and checkpoint, resume is exact, the
export is a PEFT adapter that plain transformers + PEFT load and a merged plain model with the same logits."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from transformers import AutoConfig, AutoModelForCausalLM

from parity_checks import assert_logits_close
from trainer.checkpoint.export_run import export_checkpoint
from trainer.config import load_recipe
from trainer.errors import UserError
from trainer.lora.export import merged_state_dict
from trainer.lora.run import BASE_WEIGHTS
from trainer.train import train

FAST = ["data.seq_len=64", "train.micro_batch_size=2", "optim.warmup_steps=1", "lora.enabled=true", "lora.rank=4",
        "optim.lr=1e-2"]


def _recipe(run_dir, *overrides):
    return load_recipe("tiny-moe", FAST + [f"output.dir={run_dir}", *overrides])


def _ids():
    return torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(3))


def _base_from_run(run_dir):
    """Plain transformers model (no moe_fast) with the base weights the run saved."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run_dir / "hf"), dtype=torch.float32)
    model.load_state_dict(load_file(str(run_dir / "hf" / BASE_WEIGHTS)), strict=False)
    return model.eval()


def test_lora_run_trains_adapters_only_and_exports_peft_and_merged(tmp_path):
    from peft import PeftModel

    run = tmp_path / "run"
    result = train(_recipe(run, "train.max_steps=3", "checkpoint.every_steps=2"), progress=False)
    model = result.model.eval()

    # checkpoints hold the trainable state only
    keys = FileSystemReader(str(run / "checkpoints/step_00000002")).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys[:5]

    # the base stayed bit-identical to what was built (and saved) at the start
    saved_base = load_file(str(run / "hf" / BASE_WEIGHTS))
    live = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(live[k], v) for k, v in saved_base.items())

    # export-adapter/: PEFT's format, loaded by PEFT on a plain transformers model, same logits
    adapter = run / "export-adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["target_parameters"]
    ids = _ids()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(_base_from_run(run), str(adapter)).eval()
        assert_logits_close(peft_model(input_ids=ids).logits, ours)
        # export/: base + adapter merged, plain transformers
        merged = AutoModelForCausalLM.from_pretrained(str(run / "export"), dtype=torch.float32).eval()
        assert_logits_close(merged(input_ids=ids).logits, ours)
    diff = (merged(input_ids=ids).logits - ours).abs().max().item()
    assert diff <= 1e-5


def test_lora_resume_is_exact(tmp_path):
    straight = train(_recipe(tmp_path / "a", "train.max_steps=4", "checkpoint.every_steps=2", "output.export=false"),
                     progress=False)
    resumed_dir = tmp_path / "b"
    shutil.copytree(tmp_path / "a", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints/step_00000004")
    (resumed_dir / "checkpoints/latest").write_text("step_00000002")
    resumed = train(_recipe(resumed_dir, "train.max_steps=4", "checkpoint.every_steps=2", "output.export=false"),
                    progress=False)
    assert resumed.losses == straight.losses[2:]
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), name


def test_moe_export_of_a_lora_checkpoint_writes_both_directories(tmp_path):
    result = train(_recipe(tmp_path / "run", "train.max_steps=2", "output.export=false"), progress=False)
    out, step = export_checkpoint(tmp_path / "run", tmp_path / "out", "float32")
    assert step == 2 and (tmp_path / "out-adapter/adapter_model.safetensors").is_file()
    ids = _ids()
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        assert_logits_close(merged(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)


def test_only_adapters_reach_the_optimizer_and_merge_leaves_base_untouched(tmp_path):
    result = train(_recipe(tmp_path / "run", "train.max_steps=1", "output.export=false"), progress=False)
    model = result.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged_state_dict(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads file names from /proc/self/fd")
def test_a_random_init_base_is_on_disk_before_training_starts(tmp_path, monkeypatch):
    from trainer.lora import run as lora_run

    synced, fsync = [], os.fsync

    def recording_fsync(fd):  # os is one module: DCP's checkpoint files are recorded too
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    monkeypatch.setattr(lora_run.os, "fsync", recording_fsync)
    run = tmp_path / "run"
    train(_recipe(run, "train.max_steps=1", "output.export=false"), progress=False)
    assert str((run / "hf" / BASE_WEIGHTS).resolve()) in synced


@pytest.mark.parametrize("overrides, message", [
    (["lora.dropout=0.1"], "lora.dropout=0.1 cannot apply to the routed experts"),
    (["lora.targets=[]"], "lora.targets must name at least one"),
    (["lora.targets=[no_such_module]"], "match(es) no module"),
    (["lora.rank=0"], "lora.rank must be >= 1"),
    (["parallel.ep_size=2"], "parallel.ep_size=2 needs as many processes"),
])
def test_bad_lora_recipes_are_one_line_errors(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        train(_recipe(tmp_path / "run", "train.max_steps=1", *overrides), progress=False)


@pytest.mark.parametrize("preset, family", [("qwen3-30b-a3b-lora", "qwen3_moe"), ("nemotron-3-nano-lora", "nemotron_h")])
def test_lora_presets_target_every_group_of_their_family(preset, family):
    import tiny_configs
    from trainer.lora.targets import resolve_targets
    from trainer.models import MoEAutoModelForCausalLM

    recipe = load_recipe(preset)
    assert recipe.lora.enabled and recipe.parallel.ep_size == 1 and recipe.lora.dropout == 0
    model = MoEAutoModelForCausalLM.from_config(getattr(tiny_configs, family)())
    modules, parameters = resolve_targets(model, recipe.lora.targets)
    assert parameters and modules


@pytest.mark.parametrize("mode", ["full", "moe", "attention"])
def test_lora_with_activation_checkpointing_trains_the_same(tmp_path, mode):
    plain = train(_recipe(tmp_path / "a", "train.max_steps=2", "output.export=false"), progress=False)
    recomputed = train(_recipe(tmp_path / "b", "train.max_steps=2", "output.export=false",
                               f"parallel.activation_checkpointing={mode}"), progress=False)
    assert recomputed.losses == pytest.approx(plain.losses, rel=1e-6)
    for (name, p), q in zip(plain.model.named_parameters(), recomputed.model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_adapter_directory_is_never_written_over_someones_files(tmp_path):
    from trainer.lora.export import check_adapter_target

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="adapter directory .* is not empty"):
        check_adapter_target(tmp_path / "a", overwrite=False)
    with pytest.raises(UserError, match=r"not a PEFT adapter \(no adapter_config.json\)"):
        check_adapter_target(tmp_path / "a", overwrite=True)


def test_lora_layers_compiled_with_fused_experts_and_checkpointing_train_like_eager(tmp_path):
    """The B4-lora configuration on the CPU: adapters (attention's PEFT linears, the experts' rows adapters in the
    fused expert MLP) inside torch.compile'd, fully recomputed layers. The layers stay compiled (no fall-back) and
    the losses equal the eager run's within 1e-4 relative (Inductor reorders the fp32 elementwise work)."""
    common = ["train.max_steps=3", "output.export=false", "perf.fused_experts=on",
              "parallel.activation_checkpointing=full"]
    eager = train(_recipe(tmp_path / "eager", *common, "perf.compile=off"), progress=False)
    compiled = train(_recipe(tmp_path / "compiled", *common, "perf.compile=layers"), progress=False)
    assert compiled.model.model.layers[0]._compiled_call_impl is not None  # still compiled: it did not fall back
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
