"""trainer.perf: every speed/memory option leaves the training step's math unchanged (fp32, CPU).

Tolerances: 1e-5 relative on the loss and the gradients (summation order only). Every optimizer mode must reach the
same parameters as torch's AdamW after a few steps, within 1e-5 relative (the same formula; torch's foreach kernel
against the fused one, in buckets).
"""

from __future__ import annotations

import pytest
import torch

import tiny_configs
from perf_options import perf_options
from trainer.config import OptimConfig
from trainer.data import IGNORE_INDEX
from trainer.loss import forward_loss_sum
from trainer.models import MoEAutoModelForCausalLM
from trainer.optim import AdamW, build_optimizer
from trainer.parallel.checkpointing import apply_checkpointing
from trainer.perf import apply_optimizations, disable_compile
from training_loop import micro_batch, train_steps


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    config = tiny_configs.qwen3_moe(**{"output_router_logits": True, "router_aux_loss_coef": 0.01, **overrides})
    model = MoEAutoModelForCausalLM.from_config(config)
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


IDS = torch.randint(0, tiny_configs.VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))
BATCH = micro_batch(IDS)
TRAINED = (BATCH["targets"] != IGNORE_INDEX).sum()


def _step_loss(model, options):
    """The loss TrainStep differentiates for one micro-batch: token-mean cross-entropy + the router aux loss."""
    token_loss_sum, aux = forward_loss_sum(model, BATCH, options.fused_ce)
    return token_loss_sum / TRAINED + model.config.router_aux_loss_coef * aux, token_loss_sum, aux


def _loss_and_grads(model, overrides=(), checkpointing="none"):
    apply_checkpointing(model, checkpointing)  # as trainer.parallel does, before the perf patches
    options = perf_options(*overrides)
    apply_optimizations(model, options)
    loss, token_loss_sum, aux = _step_loss(model, options)
    loss.backward()
    return (loss, token_loss_sum / TRAINED, aux), {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.grad is not None}


def _hf_loss_and_grads(model):
    """The model's own forward and loss (labels = ids): HF's token mean + coefficient * aux loss."""
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    ce = out.loss.detach() - model.config.router_aux_loss_coef * out.aux_loss.detach()
    return (out.loss, ce, out.aux_loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(got, want):
    (loss, ce, aux), grads = got
    (ref_loss, ref_ce, ref_aux), ref_grads = want
    assert aux is not None and ref_aux is not None
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    assert abs(ce.item() - ref_ce.item()) <= 1e-5 * abs(ref_ce.item())
    assert abs(aux.item() - ref_aux.item()) <= 1e-5 * abs(ref_aux.item())
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert _relative(grad, ref_grads[name]) <= 1e-5, name


@pytest.mark.parametrize("overrides, checkpointing", [
    (("fused_ce=on",), "none"), (("fused_ce=on", "fused_experts=on"), "none"), (("fused_experts=on",), "attention"),
    (("fused_ce=on",), "moe"), (("fused_ce=on", "fused_experts=on"), "full"),
])
def test_step_loss_and_gradients_equal_the_hf_forward(overrides, checkpointing):
    _assert_same_step(_loss_and_grads(_model(), overrides, checkpointing), _hf_loss_and_grads(_model()))


def _torch_adamw_reference(steps: int, lr: float):
    """`steps` steps of torch.optim.AdamW (foreach) on the plain step's loss: the parameters every mode must reach."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for _ in range(steps):
        _step_loss(model, perf_options())[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("overrides", [
    ("optimizer=after-backward",), ("optimizer=in-backward",), ("optimizer=overlap",),
    ("optimizer=in-backward", "adamw=triton"), ("optimizer=in-backward", "defer=head"),
    ("optimizer=overlap", "defer=head"), ("optimizer=in-backward", "defer=1"),
    ("optimizer=after-backward", "defer=2"), ("optimizer=after-backward", "defer=all"),
])
def test_optimizer_modes_reach_the_same_parameters_as_torch_adamw(overrides):
    reference = _torch_adamw_reference(steps=3, lr=1e-2)
    model = _model()
    train_steps(model, perf_options(*overrides), IDS, 3, lr=1e-2)
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        assert _relative(b.detach(), a.detach()) <= 1e-5, name


@pytest.mark.parametrize("defer, held", [("head", ["lm_head"]), ("1", ["lm_head", "model.layers.1."])])
def test_held_back_updates_run_when_the_next_forward_starts(defer, held):
    """defer: the step leaves the held-back parameters as they were; the next forward updates each group before its
    module reads it, so every loss equals the one without holding back (exactly: the same update, same values)."""
    losses = {}
    for spec in (("optimizer=in-backward",), ("optimizer=in-backward", f"defer={defer}")):
        model = _model()
        options = perf_options(*spec)
        optimizer = build_optimizer(model, OptimConfig(lr=1e-2, max_grad_norm=0.0), options)
        losses[spec] = []
        for _ in range(3):
            loss = _step_loss(model, options)[0]  # (runs the previous step's held-back updates)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            losses[spec].append(loss.item())
            loss.backward()
            optimizer.step()
            for name, p in model.named_parameters():
                if "weight" in name and "norm" not in name and "embed" not in name:
                    kept = any(name.startswith(prefix) for prefix in held) and len(spec) == 2
                    assert torch.equal(p, before[name]) == kept, name
        optimizer.flush()
        losses[spec].append(_step_loss(model, options)[0].item())
    assert losses[("optimizer=in-backward", f"defer={defer}")] == losses[("optimizer=in-backward",)]
    assert any("held back to the next forward" in note for note in options.notes)


def _scheduled_run(spec: tuple[str, ...], max_grad_norm: float, steps: int = 5, micro_batches=(BATCH,)):
    """`steps` TrainSteps of `micro_batches` with warmup + cosine LR and clipping at `max_grad_norm`; (losses,
    gradient norms, final parameters after the held-back updates)."""
    from trainer.optim import build_scheduler
    from trainer.step import TrainStep
    from training_loop import runtime_for

    model, options = _model(), perf_options(*spec)
    cfg = OptimConfig(lr=1e-2, max_grad_norm=max_grad_norm, warmup_steps=2, min_lr_ratio=0.1)
    optimizer = build_optimizer(model, cfg, options)
    step = TrainStep(model, optimizer, build_scheduler(optimizer, cfg, steps), runtime_for(model), options,
                     max_grad_norm)
    outputs = [step(list(micro_batches)).fetch() for _ in range(steps)]
    optimizer.flush()
    return ([o["loss"] for o in outputs], [o["grad_norm"] for o in outputs],
            {n: p.detach().clone() for n, p in model.named_parameters()})


@pytest.mark.parametrize("extra", [(), ("defer=all",)])
def test_gradient_norm_taken_in_the_backward_is_the_same_as_after_it(extra):
    """perf.grad_norm=in-backward: each gradient's norm as it completes in the last micro-batch's backward, combined
    after it. Same per-tensor norms, combined in torch's order: the norms (so the clipping) and the trained
    parameters are bit-identical to the pass after the backward, with 2 accumulated micro-batches and clipping on
    every step."""
    halves = ({k: v[:1] for k, v in BATCH.items()}, {k: v[1:] for k, v in BATCH.items()})
    losses, norms, params = _scheduled_run(("grad_norm=after-backward", *extra), 0.05, micro_batches=halves)
    got_losses, got_norms, got_params = _scheduled_run(("grad_norm=in-backward", *extra), 0.05, micro_batches=halves)
    assert all(n > 0.05 for n in norms), "every step should clip"
    assert (got_losses, got_norms) == (losses, norms)
    assert all(torch.equal(got_params[n], p) for n, p in params.items())


def test_gradient_norm_in_the_backward_says_it_is_used():
    from trainer.step import TrainStep
    from training_loop import runtime_for

    model, options = _model(), perf_options("grad_norm=in-backward")
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, max_grad_norm=1.0), options)
    step = TrainStep(model, optimizer, None, runtime_for(model), options, 1.0)
    assert step.norm_in_backward is not None
    assert any("gradient norm taken during the backward" in note for note in options.notes)


@pytest.mark.parametrize("mode, defer, max_grad_norm", [("after-backward", "all", 0.05), ("after-backward", "1", 0.05),
                                                        ("in-backward", "1", 0.0), ("in-backward", "head", 0.0)])
def test_held_back_updates_keep_the_steps_lr_clipping_and_counter(mode, defer, max_grad_norm):
    """Updates held back to the next forward use what their step had: its learning rate (the scheduler has moved on
    when they run), its clipping divisor and its step count. Same code, same values: the losses and the final
    parameters are bit-identical to the run without holding back."""
    losses, norms, params = _scheduled_run((f"optimizer={mode}",), max_grad_norm)
    held_losses, _, held_params = _scheduled_run((f"optimizer={mode}", f"defer={defer}"), max_grad_norm)
    if max_grad_norm:
        assert all(n > max_grad_norm for n in norms), "every step should clip"
    assert held_losses == losses
    assert all(torch.equal(held_params[n], p) for n, p in params.items())


def test_held_back_layers_in_compiled_layers_train_like_without():
    """defer=1 with compiled layers: the wait before the last layer runs outside its graph; losses as without."""
    losses = {}
    base = ("fused_experts=on", "compile=layers", "optimizer=in-backward")
    for spec in (base, base + ("defer=1",)):
        torch._dynamo.reset()
        model = _model()
        options = perf_options(*spec)
        apply_optimizations(model, options)
        _, losses[spec] = train_steps(model, options, IDS, 3, lr=1e-2)
    assert losses[base + ("defer=1",)] == pytest.approx(losses[base], rel=1e-5)


def test_defer_head_with_tied_embeddings_is_off_and_says_why():
    torch.manual_seed(0)
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe(tie_word_embeddings=True))
    options = perf_options("optimizer=in-backward", "defer=head")
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2), options)
    assert not optimizer._defer_group
    assert any("defer=head needs an output head not tied" in note for note in options.notes)


@pytest.mark.parametrize("mode", ["after-backward", "in-backward"])
def test_triton_adamw_off_cuda_says_so_and_uses_torchs_kernel(mode):
    options = perf_options(f"optimizer={mode}", "adamw=triton")
    optimizer = build_optimizer(_model(), OptimConfig(lr=1e-3), options)
    assert options.adamw == "triton" and not optimizer.triton_kernel
    assert any("Triton AdamW needs triton and CUDA parameters" in note for note in options.notes)


def test_in_backward_optimizer_leaves_no_gradients_behind():
    model = _model()
    options = perf_options("optimizer=in-backward")
    build_optimizer(model, OptimConfig(lr=1e-3), options)
    _step_loss(model, options)[0].backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("mode", ["after-backward", "in-backward"])
def test_optimizer_launches_one_update_per_layer(monkeypatch, mode):
    """Whether in the backward or after it, each decoder layer's parameters are one fused-kernel launch (one
    weight-decay setting here), and each parameter outside the layers one of its own."""
    model = _model()
    options = perf_options(f"optimizer={mode}")
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3), options)
    launches = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda params, *a, **k: (launches.append(len(params)),
                                                                         real(params, *a, **k)))
    _step_loss(model, options)[0].backward()
    optimizer.step()
    layers = len(model.model.layers)
    outside = sum(1 for n, _ in model.named_parameters() if not n.startswith("model.layers."))
    assert len(launches) == layers + outside
    assert sum(launches) == sum(1 for _ in model.parameters())


def test_bucket_with_an_unused_parameter_is_updated_by_step():
    torch.manual_seed(0)
    used, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    reference = [p.detach().clone().requires_grad_() for p in used.parameters()]
    params = [*used.parameters(), *unused.parameters()]
    optimizer = AdamW([{"params": params, "weight_decay": 0.0}], 1e-2, (0.9, 0.95), 1e-8, in_backward=True,
                      buckets=[params])
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    x = torch.randn(3, 4)
    for _ in range(2):
        used(x).square().sum().backward()  # the bucket never completes: `unused` gets no gradient
        assert used.weight.grad is not None  # waiting for the rest of its bucket
        optimizer.step()
        torch.nn.functional.linear(x, reference[0], reference[1]).square().sum().backward()
        torch_adamw.step()
        torch_adamw.zero_grad()
        assert used.weight.grad is None
    # fp32, one tensor at a time in both: only the kernels' arithmetic order differs
    for a, b in zip(used.parameters(), reference):
        assert _relative(a.detach(), b.detach()) <= 1e-6


def test_held_gradients_live_until_step():
    model = _model()
    optimizer = AdamW([{"params": list(model.parameters()), "weight_decay": 0.0}], 1e-3, (0.9, 0.95), 1e-8,
                      in_backward=True, hold_gradients=True)
    _step_loss(model, perf_options())[0].backward()
    assert all(p.grad is None for p in model.parameters())
    assert len(optimizer._held) == sum(1 for _ in model.parameters())
    optimizer.step()
    assert optimizer._held == []


def test_cuda_graphs_fall_back_to_compiled_layers_off_cuda():
    model = _model()
    options = perf_options("fused_experts=on", "compile=layers-graphs")
    notes = apply_optimizations(model, options)
    assert options.compile == "layers"
    assert any("CUDA graphs need one CUDA device" in n for n in notes)


def test_only_fp32_expert_weights_keep_cuda_graphs_off_not_fp32_adapters():
    """fp32 experts loop on the host over row counts (no graphs); a bf16 base with fp32 LoRA adapters does not: the
    adapters' factors enter the grouped GEMMs in the rows' dtype."""
    from trainer.config import LoraConfig
    from trainer.lora import apply_lora
    from trainer.perf import has_fp32_expert_weights

    assert has_fp32_expert_weights(MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe()))
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe()).to(torch.bfloat16)
    assert not has_fp32_expert_weights(model)
    apply_lora(model, LoraConfig(enabled=True, rank=4, alpha=8, targets=["attention", "experts"]))
    assert any(p.dtype == torch.float32 for p in model.parameters())  # the adapters
    assert not has_fp32_expert_weights(model)


def test_compiled_layers_with_fused_experts_are_one_graph_and_equal_the_hf_forward():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    reference = _hf_loss_and_grads(_model())
    compiled = _loss_and_grads(_model(), ("fused_ce=on", "fused_experts=on", "compile=layers"))
    # the expert MLP is one custom op and the router logits are captured without the ContextVar: no break
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] >= 1
    _assert_same_step(compiled, reference)


def test_every_layer_is_compiled_past_dynamos_default_recompile_limit():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe(num_hidden_layers=10, output_router_logits=True))
    options = perf_options("fused_ce=on", "fused_experts=on", "compile=layers")
    apply_optimizations(model, options)
    for _ in range(2):
        _step_loss(model, options)[0].backward()
    # one graph per layer (each sees a longer router-logits list); none left to run eagerly past the limit of 8
    assert counters["stats"]["unique_graphs"] >= 10
    assert dict(counters["graph_break"]) == {}


def test_disable_compile_restores_eager_modules():
    model = _model()
    options = perf_options("compile=layers")
    notes = apply_optimizations(model, options)
    assert any("torch.compile (layers)" in n for n in notes)
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert disable_compile(model)
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    _step_loss(model, options)[0].backward()  # runs eagerly


def test_liger_falls_back_with_a_note_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    notes = apply_optimizations(_model(), perf_options("kernels=liger"))
    assert any("liger not importable" in n for n in notes)


def test_compiled_runs_leave_rmsnorm_to_inductor_instead_of_liger():
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe())
    notes = apply_optimizations(model, perf_options("kernels=liger", "compile=layers"))
    assert any("RMSNorm left to torch.compile" in note for note in notes)
    assert all(type(m).__name__ != "LigerRMSNorm" for m in model.modules())


def test_high_graph_priority_without_cuda_graphs_says_so():
    options = perf_options("compile=layers", "graph_priority=high")
    notes = apply_optimizations(_model(), options)
    assert any("graph_priority=high needs compile=layers-graphs" in note for note in notes)
    assert options.graph_priority == "default"


def test_auto_graph_priority_is_high_only_with_cuda_graphs_and_without_replicas():
    from trainer.parallel.replicate import REPLICA_GRADIENTS
    from trainer.perf import _set_graph_priority

    options = perf_options("optimizer=overlap", "compile=layers", "graph_priority=auto")
    assert _set_graph_priority(_model(), options) is None  # CUDA graphs fell back (no GPU): auto says nothing
    assert options.graph_priority == "default"
    options = perf_options("optimizer=overlap", "compile=layers-graphs", "graph_priority=auto")
    replicated = _model()
    replicated.__dict__[REPLICA_GRADIENTS] = object()  # what trainer.parallel.replicate leaves on a replica
    assert "default priority" in _set_graph_priority(replicated, options)
    assert options.graph_priority == "default"


def test_step_priority_is_settled_for_the_step_loop():
    """`step_priority=high` asks for the step on a high-priority stream; `auto` only beside the overlapped
    optimizer and without replicas. Settled to "high" or "default" (what `step_stream` reads), with a note where it
    falls back."""
    from trainer.parallel.replicate import REPLICA_GRADIENTS
    from trainer.perf import _resolve_step_priority

    options = perf_options("step_priority=high")
    assert options.step_priority == "high"
    assert "needs CUDA" in _resolve_step_priority(_model(), options)  # this machine's model is on the CPU
    assert options.step_priority == "default"
    options = perf_options("optimizer=in-backward", "step_priority=auto")
    assert _resolve_step_priority(_model(), options) is None and options.step_priority == "default"
    replicated = _model()
    replicated.__dict__[REPLICA_GRADIENTS] = object()
    options = perf_options("optimizer=overlap", "step_priority=auto")
    assert "default priority" in _resolve_step_priority(replicated, options)
    assert options.step_priority == "default"


def test_step_stream_leaves_cpu_steps_on_the_current_stream():
    from trainer.step import step_stream

    with step_stream(perf_options("step_priority=high"), torch.device("cpu")):
        ids = torch.ones(2, 3)
    assert ids.sum() == 6


def test_perf_auto_keeps_the_recipes_semantics_and_picks_cuda_graphs_only_beside_an_in_backward_optimizer():
    """`perf: auto` on CUDA: fused loss and experts, Liger, the Triton AdamW after the backward (clipping and
    accumulation keep working), compiled layers without CUDA graphs (beside AdamW after the backward cudagraph trees
    left their fast path on an H200: docs/BENCHMARKS.md), prefetched batches. The overlapped optimizer, which a
    recipe must ask for, gets CUDA-graph layers. On the CPU only the fused loss."""
    from trainer.config import PerfConfig
    from trainer.perf import resolve_perf

    cuda = resolve_perf(PerfConfig(), torch.device("cuda"))
    assert (cuda.fused_ce, cuda.fused_experts, cuda.kernels, cuda.compile, cuda.optimizer, cuda.adamw,
            cuda.prefetch) == (True, True, "liger", "layers", "after-backward", "triton", True)
    overlap = resolve_perf(PerfConfig(optimizer="overlap"), torch.device("cuda"))
    assert (overlap.compile, overlap.optimizer) == ("layers-graphs", "overlap")
    cpu = resolve_perf(PerfConfig(), torch.device("cpu"))
    assert (cpu.fused_ce, cpu.fused_experts, cpu.compile, cpu.adamw, cpu.prefetch) == (True, False, "off", "torch",
                                                                                       False)


def test_perf_auto_for_adapters_keeps_the_update_and_the_norm_in_the_step():
    """Only LoRA adapters train (`adapters=True`): auto picks torch's multi-tensor AdamW, no held-back updates and
    the norm after the backward (one launch per tensor cost B4-lora 5,466 vs 7,070 tok/s on an H200); the other
    choices are those of full fine-tuning, and keys the recipe sets stay as set."""
    from trainer.config import PerfConfig
    from trainer.perf import resolve_perf

    full = resolve_perf(PerfConfig(), torch.device("cuda"))
    lora = resolve_perf(PerfConfig(), torch.device("cuda"), adapters=True)
    assert (full.adamw, full.defer, full.grad_norm) == ("triton", "all", "in-backward")
    assert (lora.adamw, lora.defer, lora.grad_norm) == ("torch", "none", "after-backward")
    assert {k: v for k, v in lora.as_dict().items() if k not in ("adamw", "defer", "grad_norm")} == {
        k: v for k, v in full.as_dict().items() if k not in ("adamw", "defer", "grad_norm")}
    asked = resolve_perf(PerfConfig(adamw="triton", defer="all", grad_norm="in-backward"), torch.device("cuda"),
                         adapters=True)
    assert (asked.adamw, asked.defer, asked.grad_norm) == ("triton", "all", "in-backward")


def test_compiled_layers_count_routed_tokens_like_eager_layers():
    """The expert-load hooks, outside torch.compile (between two graphs of a compiled layer) or traced into it,
    count every routed token once per chosen expert, exactly as the eager model does (same routing: fp32, the
    router's top-k on the same logits up to summation order; the counts are integers)."""
    from torch._dynamo.utils import counters

    from trainer.metrics import ExpertLoadTracker

    counts = {}
    for compile_mode, traced in (("off", False), ("layers", False), ("layers", True)):
        torch._dynamo.reset()
        counters.clear()
        model = _model()
        tracker = ExpertLoadTracker(model, traced=traced)  # before compiling, as `moe train` does
        apply_optimizations(model, perf_options("fused_experts=on", f"compile={compile_mode}"))
        forward_loss_sum(model, BATCH)[0].backward()
        counts[compile_mode, traced] = tracker.snapshot()
        if traced:  # one graph per layer: what CUDA-graph layers need
            assert counters["stats"]["unique_graphs"] == model.config.num_hidden_layers
    expected = counts["off", False]
    assert expected.sum() == IDS.numel() * 2 * model.config.num_hidden_layers
    for key in (("layers", False), ("layers", True)):  # between two graphs, and traced into the one graph
        torch.testing.assert_close(counts[key], expected, rtol=0, atol=0, msg=str(key))
