"""The training loop on the tiny model, in process: schedule, accumulation, run-dir safety, metrics and FLOPs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoConfig

import tiny_configs
from trainer.config import load_recipe, resolve_path
from trainer.errors import UserError
from trainer.metrics import ExpertLoadTracker, flops_per_token, read_metrics
from trainer.models import MoEAutoModelForCausalLM
from trainer.optim import lr_multiplier
from trainer.train import train

FAST = ["data.seq_len=128", "train.micro_batch_size=2", "train.log_every=1", "optim.warmup_steps=2"]


def _recipe(run_dir, *overrides):
    return load_recipe("tiny-moe", FAST + [f"output.dir={run_dir}", *overrides])


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    values = [lr_multiplier(s, warmup_steps=4, max_steps=20, min_lr_ratio=0.1) for s in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0) and values[-1] == pytest.approx(0.1)
    assert values[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(values[4:], values[5:]))


def test_a_short_run_writes_metrics_checkpoint_export_and_plots(tmp_path):
    result = train(_recipe(tmp_path / "run", "train.max_steps=4", "checkpoint.every_steps=2"), progress=False)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tflops", "mfu", "peak_memory_gib",
                "expert_load_max_over_mean"):
        assert all(key in r for r in records), key
    assert records[0]["tokens"] == 2 * 128
    assert all(1.0 <= r["expert_load_max_over_mean"] <= 8.0 for r in records)  # 8 experts
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step_00000004"
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    assert (result.export_dir / "model.safetensors").is_file() and (result.export_dir / "tokenizer.json").is_file()
    assert json.loads((result.export_dir / "config.json").read_text())["dtype"] == "float32"
    assert (tmp_path / "run/loss.png").is_file() and (tmp_path / "run/expert_load.png").is_file()


def test_gradient_accumulation_matches_one_bigger_micro_batch(tmp_path):
    one = train(_recipe(tmp_path / "a", "train.max_steps=2", "output.export=false"), progress=False)
    accumulated = train(_recipe(tmp_path / "b", "train.max_steps=2", "output.export=false",
                                "train.micro_batch_size=1", "train.grad_accum_steps=2"), progress=False)
    # The same rows, split into two micro-batches: the token-mean loss and the update are the same.
    assert accumulated.losses == pytest.approx(one.losses, rel=1e-5)
    for (name, p), q in zip(one.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_same_seed_same_losses(tmp_path):
    first = train(_recipe(tmp_path / "a", "train.max_steps=3", "output.export=false"), progress=False)
    second = train(_recipe(tmp_path / "b", "train.max_steps=3", "output.export=false"), progress=False)
    assert first.losses == second.losses


def test_fresh_run_refuses_a_directory_holding_another_runs_checkpoints(tmp_path):
    train(_recipe(tmp_path / "run", "train.max_steps=1", "output.export=false"), progress=False)
    with pytest.raises(UserError, match="already holds another run"):
        train(_recipe(tmp_path / "run", "train.max_steps=1", "checkpoint.resume=never"), progress=False)
    again = train(_recipe(tmp_path / "run", "train.max_steps=1", "checkpoint.resume=never", "output.overwrite=true",
                          "output.export=false"), progress=False)
    assert again.step == 1 and len(read_metrics(tmp_path / "run")) == 1


def test_resume_auto_continues_from_the_latest_checkpoint(tmp_path):
    train(_recipe(tmp_path / "run", "train.max_steps=2", "output.export=false"), progress=False)
    result = train(_recipe(tmp_path / "run", "train.max_steps=3", "output.export=false"), progress=False)
    assert result.step == 3 and len(result.losses) == 1
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_resuming_with_another_model_is_refused(tmp_path):
    train(_recipe(tmp_path / "run", "train.max_steps=1", "output.export=false"), progress=False)
    with pytest.raises(UserError, match="config_overrides"):
        train(_recipe(tmp_path / "run", "train.max_steps=2", "model.config_overrides.num_hidden_layers=1"),
              progress=False)


def _tiny_model():
    config = AutoConfig.from_pretrained(resolve_path("builtin:tiny-qwen3-moe"))
    return MoEAutoModelForCausalLM.from_config(config), config


def test_flops_count_only_the_top_k_experts():
    model, c = _tiny_model()
    attention = c.hidden_size * c.head_dim * (c.num_attention_heads + 2 * c.num_key_value_heads) \
        + c.num_attention_heads * c.head_dim * c.hidden_size  # q, k, v, o projections
    router = c.num_experts * c.hidden_size
    experts_top_k = c.num_experts_per_tok * 3 * c.hidden_size * c.moe_intermediate_size
    per_layer = attention + router + experts_top_k
    expected = c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size  # + LM head; embedding is a lookup
    seq = 256
    attention_term = 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq
    assert flops_per_token(model, seq) == pytest.approx(6 * expected + attention_term)


def test_expert_load_counts_every_routed_token_once_per_chosen_expert():
    model, config = _tiny_model()
    tracker = ExpertLoadTracker(model)
    with torch.no_grad():
        model(input_ids=torch.randint(0, config.vocab_size, (2, 10)), use_cache=False)
    counts_LE = tracker.pop()
    assert counts_LE.shape == (config.num_hidden_layers, config.num_experts)
    assert counts_LE.sum(dim=1).tolist() == [2 * 10 * config.num_experts_per_tok] * config.num_hidden_layers
    assert tracker.pop().sum() == 0 and tracker.total_LE.sum() == counts_LE.sum()


def test_expert_load_snapshots_queue_the_counts_since_the_last_and_add_sums_them():
    """`snapshot()` hands over the counts since the previous snapshot (on the model's device) and starts from zero;
    `add()` sums the snapshots once on the host: the run's total, as `pop()` keeps it."""
    model, config = _tiny_model()
    tracker = ExpertLoadTracker(model)
    ids = torch.randint(0, config.vocab_size, (2, 10))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        first = tracker.snapshot()
        model(input_ids=ids[:1], use_cache=False)
        second = tracker.snapshot()
    per_layer = [config.num_experts_per_tok * n for n in (2 * 10, 10)]
    assert first.sum(dim=1).tolist() == [per_layer[0]] * config.num_hidden_layers
    assert second.sum(dim=1).tolist() == [per_layer[1]] * config.num_hidden_layers
    tracker.add(first)
    tracker.add(second)
    torch.testing.assert_close(tracker.total_LE, first + second, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["full", "moe"])
def test_router_forwards_recomputed_in_the_backward_are_not_counted(mode):
    """Activation checkpointing runs each router again in the backward; with `recomputes=True` (what `moe train`
    passes when checkpointing is on) a training step counts each routed token once, as without checkpointing."""
    from trainer.loss import forward_loss_sum
    from trainer.parallel.checkpointing import apply_checkpointing
    from training_loop import micro_batch

    ids = torch.randint(0, tiny_configs.VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    counts = {}
    for checkpointing, recomputes in (("none", False), (mode, False), (mode, True)):
        torch.manual_seed(0)
        model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe())
        apply_checkpointing(model, checkpointing)
        tracker = ExpertLoadTracker(model, recomputes=recomputes)
        forward_loss_sum(model, micro_batch(ids))[0].backward()
        counts[checkpointing, recomputes] = tracker.snapshot()
    torch.testing.assert_close(counts[mode, True], counts["none", False], rtol=0, atol=0)
    torch.testing.assert_close(counts[mode, False], 2 * counts["none", False], rtol=0, atol=0)  # the router ran twice


def test_non_finite_steps_are_skipped_and_too_many_in_a_row_stop_the_run(tmp_path, monkeypatch):
    from trainer import step as step_module

    real, calls = step_module.forward_loss_sum, []

    def inf_after_the_first_step(model, batch, fused_ce=False):  # a recipe can no longer ask for lr=1e30
        calls.append(1)
        loss, aux = real(model, batch, fused_ce)
        return (loss if len(calls) == 1 else loss * float("inf")), aux

    monkeypatch.setattr(step_module, "forward_loss_sum", inf_after_the_first_step)
    recipe = _recipe(tmp_path / "run", "train.max_steps=10", "optim.max_grad_norm=0", "optim.warmup_steps=0",
                     "train.nonfinite_max_consecutive=2", "data.seq_len=64")
    with pytest.raises(UserError, match="NaN/inf for 2 steps in a row"):
        train(recipe, progress=False)
    records = read_metrics(tmp_path / "run")
    assert records[-1].get("skipped") and records[-2].get("skipped") and not records[0].get("skipped")


def test_a_user_error_leaves_no_run_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        train(_recipe(tmp_path / "run", f"data.train_path={tmp_path / 'missing.jsonl'}"), progress=False)
    assert not (tmp_path / "run").exists()
