"""The loop's perf options and start-up memory check: the fused loss equals the plain one without building full
logits, the recipe's `perf` section resolves per device, and `moe train` refuses a layout the planner says cannot
fit (before any weight is loaded, leaving no run directory) unless `parallel.check_memory=false`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from trainer.cli import main as moe
from trainer.config import PerfConfig, load_recipe, resolve_path
from trainer.data import IGNORE_INDEX
from trainer.loss import forward_loss_sum
from trainer.models import MoEAutoModelForCausalLM
from trainer.perf import resolve_perf

TINY = ["data.seq_len=64", "train.micro_batch_size=2", "output.export=false", "train.max_steps=1"]


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (2, 24), generator=generator)
    targets = input_ids.roll(-1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    targets[0, :5] = IGNORE_INDEX  # a prompt: not trained on
    return {"input_ids": input_ids, "targets": targets, "position_ids": torch.arange(24).repeat(2, 1)}


def test_fused_loss_equals_the_plain_loss_and_gradients_without_full_logits():
    config = AutoConfig.from_pretrained(resolve_path("builtin:tiny-qwen3-moe"))
    torch.manual_seed(0)
    plain = MoEAutoModelForCausalLM.from_config(config)
    fused = MoEAutoModelForCausalLM.from_config(config)
    fused.load_state_dict(plain.state_dict())
    batch = _batch(config.vocab_size)
    head_outputs = []
    fused.lm_head.register_forward_hook(lambda m, i, out: head_outputs.append(tuple(out.shape)))

    loss_plain, _ = forward_loss_sum(plain, batch, fused_ce=False)
    loss_fused, _ = forward_loss_sum(fused, batch, fused_ce=True)
    loss_plain.backward()
    loss_fused.backward()

    assert head_outputs == [()]  # the head returned the summed loss, never [B, S, V] logits
    torch.testing.assert_close(loss_fused, loss_plain, rtol=1e-5, atol=0)  # summation order only
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert fused(batch["input_ids"]).logits.shape == (2, 24, config.vocab_size)  # outside the loss: plain logits


def _resolved(options) -> tuple:
    return (options.fused_ce, options.fused_experts, options.kernels, options.compile, options.optimizer,
            options.adamw, options.defer, options.grad_norm, options.prefetch)


def test_perf_defaults_are_fused_everything_on_gpu_and_only_the_fused_loss_on_cpu():
    """`auto` settles per device: on CUDA compiled layers without CUDA graphs beside AdamW after the backward, every
    layer's update held back to the next forward."""
    assert _resolved(resolve_perf(PerfConfig(), torch.device("cuda"))) == (
        True, True, "liger", "layers", "after-backward", "triton", "all", "in-backward", True)
    assert _resolved(resolve_perf(PerfConfig(), torch.device("cpu"))) == (
        True, False, "torch", "off", "after-backward", "torch", "none", "after-backward", False)


@pytest.mark.parametrize("optimizer, compile_mode", [("in-backward", "auto"), ("overlap", "auto"),
                                                     ("after-backward", "layers-graphs")])
def test_auto_defer_and_norm_in_backward_stay_off_beside_an_in_backward_optimizer_or_cuda_graph_layers(
        optimizer, compile_mode):
    options = resolve_perf(PerfConfig(optimizer=optimizer, compile=compile_mode), torch.device("cuda"))
    assert (options.defer, options.grad_norm) == ("none", "after-backward")


def test_auto_norm_in_backward_is_one_process_only():
    assert resolve_perf(PerfConfig(), torch.device("cuda"), world_size=2).grad_norm == "after-backward"


def test_perf_values_the_recipe_sets_are_kept_as_they_are():
    explicit = PerfConfig(fused_ce="off", fused_experts="off", kernels="torch", compile="layers", optimizer="overlap",
                          adamw="torch", prefetch="off", defer="2", graph_priority="high", step_priority="default")
    options = resolve_perf(explicit, torch.device("cuda"), world_size=8)
    assert _resolved(options) == (False, False, "torch", "layers", "overlap", "torch", "2", "after-backward", False)
    assert (options.defer, options.graph_priority, options.step_priority) == ("2", "high", "default")


def test_moe_train_refuses_a_layout_that_does_not_fit_the_gpu_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("trainer.train.accelerator_memory_gib", lambda rt: 0.5)  # a "GPU" of 0.5 GiB
    run_dir = tmp_path / "run"
    code = moe(["train", "tiny-moe", *TINY, f"output.dir={run_dir}", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: layout ep=1 shard=1") and "needs about" in err and "\n" not in err
    assert "parallel.check_memory=false" in err
    assert not run_dir.exists()


def test_parallel_check_memory_false_lets_it_try(tmp_path, monkeypatch):
    monkeypatch.setattr("trainer.train.accelerator_memory_gib", lambda rt: 0.5)
    code = moe(["train", "tiny-moe", *TINY, f"output.dir={tmp_path / 'run'}", "parallel.check_memory=false",
                "--no-progress"])
    assert code == 0 and (tmp_path / "run/checkpoints/latest").is_file()


@pytest.mark.parametrize("key", ["perf.fused_ce=maybe", "perf.compile=layers-all", "perf.optimizer=fused"])
def test_perf_values_outside_the_schema_are_refused(key):
    from trainer.errors import UserError

    with pytest.raises(UserError, match="must be one of"):
        load_recipe("tiny-moe", [key])


def test_compiled_layers_train_like_eager_layers(tmp_path):
    """perf.compile=layers (CPU Inductor here): the warm-up batch leaves no trace, and the losses equal the eager run's
    within 1e-4 relative (Inductor fuses the fp32 elementwise work in another order)."""
    from trainer.train import train

    losses = {}
    for mode in ("off", "layers"):
        recipe = load_recipe("tiny-moe", [*TINY, "train.max_steps=3", f"perf.compile={mode}",
                                          f"output.dir={tmp_path / mode}"])
        result = train(recipe, progress=False)
        losses[mode] = result.losses
        if mode == "layers":
            assert result.model.model.layers[0]._compiled_call_impl is not None  # still compiled: it did not fall back
    torch.testing.assert_close(torch.tensor(losses["layers"]), torch.tensor(losses["off"]), rtol=1e-4, atol=0)


def test_a_layer_that_fails_to_compile_falls_back_to_eager(tmp_path, monkeypatch, capsys):
    def broken(model, mode, **_):
        for layer in model.model.layers:
            layer._compiled_call_impl = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("inductor says no"))
        model._moe_compiled = list(model.model.layers)
        return "torch.compile (layers) on 2 modules"

    monkeypatch.setattr("trainer.perf._apply_compile", broken)
    from trainer.train import train

    recipe = load_recipe("tiny-moe", [*TINY, "train.max_steps=2", "perf.compile=layers", f"output.dir={tmp_path / 'run'}"])
    result = train(recipe, progress=False)
    assert "torch.compile failed at the first batch (RuntimeError: inductor says no): eager instead" in capsys.readouterr().out
    assert result.step == 2 and all(layer._compiled_call_impl is None for layer in result.model.model.layers)
