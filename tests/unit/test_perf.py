"""trainer.perf: every speed/memory option leaves the training step's math unchanged (fp32, CPU).

Tolerances: 1e-5 relative on the loss and the gradients (summation order only). The optimizer variants must give
the same parameters as torch's AdamW after a few steps.
"""

from __future__ import annotations


import pytest
import torch

import tiny_configs
from training_loop import train_steps
from trainer.kernels import adamw as adamw_kernel
from trainer.models import MoEAutoModelForCausalLM
from trainer.perf import PerfOptions, apply_optimizations, causal_lm_loss, disable_compile
from trainer.step_optimizer import _PerParamAdamW, build_optimizer


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _model(seed=0):
    torch.manual_seed(seed)
    config = tiny_configs.qwen3_moe(output_router_logits=True, router_aux_loss_coef=0.01)
    model = MoEAutoModelForCausalLM.from_config(config)
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


IDS = torch.randint(0, tiny_configs.VOCAB, (2, 20), generator=torch.Generator().manual_seed(5))


def _loss_and_grads(model, spec: str):
    options = PerfOptions.parse(spec)
    apply_optimizations(model, options)
    step = causal_lm_loss(model, IDS, IDS, options)
    step.loss.backward()
    return step, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_option_strings_parse_shortcuts_and_key_values():
    options = PerfOptions.parse("best+ac=attn+compile=none")
    assert (options.loss, options.fused_experts, options.kernels, options.optimizer, options.ac, options.compile) == (
        "fused", True, "liger", "overlap", "attn", "none")
    assert options.adamw == "triton"
    assert PerfOptions.parse("best+adamw_launch=512x2").adamw_launch == "512x2"
    assert PerfOptions.parse("base") == PerfOptions()
    with pytest.raises(ValueError, match="unknown option 'nope'"):
        PerfOptions.parse("nope")
    with pytest.raises(ValueError, match="choose one of"):
        PerfOptions.parse("ac=everything")


@pytest.mark.parametrize("spec", ["loss=chunked", "loss=chunked+fused-experts", "fused-experts+ac=attn",
                                  "loss=chunked+ac=mlp", "loss=chunked+fused-experts+ac=full"])
def test_step_loss_and_gradients_equal_the_hf_forward(spec):
    reference, optimized = _model(), _model()
    ref_step, ref_grads = _loss_and_grads(reference, "base")
    step, grads = _loss_and_grads(optimized, spec)
    assert ref_step.aux is not None and step.aux is not None
    assert abs(step.loss.item() - ref_step.loss.item()) <= 1e-5 * abs(ref_step.loss.item())
    assert abs(step.ce.item() - ref_step.ce.item()) <= 1e-5 * abs(ref_step.ce.item())
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert _relative(grad, ref_grads[name]) <= 1e-5, name


def test_fused_loss_never_returns_full_logits():
    model = _model()
    options = PerfOptions.parse("loss=chunked")
    seen = []
    handle = model.lm_head.register_forward_hook(lambda m, i, out: seen.append(tuple(out.shape)))
    causal_lm_loss(model, IDS, IDS, options)
    handle.remove()
    assert seen == [()]  # the head returned the summed loss, not [B, S, V] logits
    assert model(IDS).logits.shape == (2, 20, tiny_configs.VOCAB)  # outside the loss the head is a plain linear


def _train(spec: str, steps=3, dtype=torch.float32):
    model = _model().to(dtype)
    train_steps(model, PerfOptions.parse(spec), IDS, steps, lr=1e-2)
    return model


@pytest.mark.parametrize("spec", ["fused-adamw", "opt-in-bwd", "opt-overlap", "master-fp32", "opt-in-bwd+triton-adamw",
                                  "opt-in-bwd+defer-head", "opt-overlap+defer-head+master-fp32", "opt-in-bwd+defer=1"])
def test_optimizer_variants_reach_the_same_parameters_as_torch_adamw(spec):
    reference, other = _train("base"), _train(spec)
    for (name, a), (_, b) in zip(reference.named_parameters(), other.named_parameters()):
        assert _relative(b.detach(), a.detach()) <= 1e-5, name


def test_fp32_master_weights_keep_updates_that_bf16_weights_would_round_away():
    model = _model().to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    options = PerfOptions.parse("master-fp32")
    optimizer = build_optimizer(model, options, lr=1e-6)
    for _ in range(4):
        causal_lm_loss(model, IDS, IDS, options).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    master = optimizer._entries[model.lm_head.weight][0]
    assert master.dtype == torch.float32
    assert not torch.equal(master.bfloat16(), master)  # the fp32 copy holds more than bf16 can
    assert (master - before["lm_head.weight"].float()).abs().max() > 0


@pytest.mark.parametrize("defer, held", [("head", ["lm_head"]), ("1", ["lm_head", "model.layers.1."])])
def test_held_back_updates_run_when_the_next_forward_starts(defer, held):
    """defer: the step leaves the held-back parameters as they were; the next forward updates each group before its
    module reads it, so every loss equals the one without holding back (exactly: the same update, same values)."""
    losses = {}
    for spec in ("opt-in-bwd", f"opt-in-bwd+defer={defer}"):
        model = _model()
        options = PerfOptions.parse(spec)
        optimizer = build_optimizer(model, options, lr=1e-2)
        losses[spec] = []
        for _ in range(3):
            loss = causal_lm_loss(model, IDS, IDS, options).loss  # (runs the previous step's held-back updates)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            losses[spec].append(loss.item())
            loss.backward()
            optimizer.step()
            for name, p in model.named_parameters():
                if "weight" in name and "norm" not in name and "embed" not in name:
                    kept = any(name.startswith(prefix) for prefix in held) and "defer" in spec
                    assert torch.equal(p, before[name]) == kept, name
        optimizer.flush()
        losses[spec].append(causal_lm_loss(model, IDS, IDS, options).loss.item())
    assert losses[f"opt-in-bwd+defer={defer}"] == losses["opt-in-bwd"]
    assert any("held back to the next forward" in note for note in options.notes)


def test_held_back_layers_in_compiled_layers_train_like_without():
    """defer=1 with compiled layers: the wait before the last layer runs outside its graph; losses as without."""
    losses = {}
    for spec in ("fused-experts+compile-all+opt-in-bwd", "fused-experts+compile-all+opt-in-bwd+defer=1"):
        torch._dynamo.reset()
        model = _model()
        options = PerfOptions.parse(spec)
        apply_optimizations(model, options)
        optimizer = build_optimizer(model, options, lr=1e-2)
        losses[spec] = []
        for _ in range(3):
            loss = causal_lm_loss(model, IDS, IDS, options).loss
            losses[spec].append(loss.item())
            loss.backward()
            optimizer.step()
    assert losses[spec] == pytest.approx(losses["fused-experts+compile-all+opt-in-bwd"], rel=1e-5)


def test_defer_head_with_tied_embeddings_is_off_and_says_why():
    torch.manual_seed(0)
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe(tie_word_embeddings=True))
    options = PerfOptions.parse("opt-in-bwd+defer-head")
    optimizer = build_optimizer(model, options, lr=1e-2)
    assert not optimizer._defer_group
    assert any("defer=head needs an output head not tied" in note for note in options.notes)


def test_triton_adamw_launch_shape_reaches_the_optimizer():
    optimizer = build_optimizer(_model(), PerfOptions.parse("opt-in-bwd+triton-adamw+adamw_launch=2048x8"), lr=1e-3)
    assert optimizer.triton_launch == {"BLOCK": 2048, "num_warps": 8}
    default = build_optimizer(_model(), PerfOptions.parse("opt-in-bwd+triton-adamw"), lr=1e-3)
    assert default.triton_launch == adamw_kernel.DEFAULT_CONFIG


def test_triton_adamw_off_cuda_says_so_and_uses_torchs_kernel():
    model = _model()
    options = PerfOptions.parse("opt-in-bwd+triton-adamw")
    optimizer = build_optimizer(model, options, lr=1e-3)
    assert options.adamw == "triton" and not optimizer.triton_kernel
    assert any("Triton AdamW needs triton and CUDA parameters" in note for note in options.notes)


def test_in_backward_optimizer_leaves_no_gradients_behind():
    model = _model()
    options = PerfOptions.parse("opt-in-bwd")
    build_optimizer(model, options, lr=1e-3)
    causal_lm_loss(model, IDS, IDS, options).loss.backward()
    assert all(p.grad is None for p in model.parameters())


def test_in_backward_optimizer_launches_one_update_per_layer(monkeypatch):
    model = _model()
    options = PerfOptions.parse("opt-in-bwd")
    optimizer = build_optimizer(model, options, lr=1e-3)
    launches = []
    real = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda params, *a, **k: (launches.append(len(params)),
                                                                         real(params, *a, **k)))
    causal_lm_loss(model, IDS, IDS, options).loss.backward()
    optimizer.step()
    layers = len(model.model.layers)
    outside = sum(1 for n, _ in model.named_parameters() if not n.startswith("model.layers."))
    assert len(launches) == layers + outside  # a bucket per decoder layer, one per parameter outside them
    assert sum(launches) == sum(1 for _ in model.parameters())


def test_bucket_with_an_unused_parameter_is_updated_by_step():
    torch.manual_seed(0)
    used, unused = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    reference = [p.detach().clone().requires_grad_() for p in used.parameters()]
    params = [*used.parameters(), *unused.parameters()]
    optimizer = _PerParamAdamW(params, 1e-2, (0.9, 0.95), 1e-8, 0.0, master_fp32=False, in_backward=True,
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
    for a, b in zip(used.parameters(), reference):
        assert _relative(a.detach(), b.detach()) <= 1e-6


def test_held_gradients_live_until_step():
    model = _model()
    optimizer = _PerParamAdamW(list(model.parameters()), 1e-3, (0.9, 0.95), 1e-8, 0.0, master_fp32=False,
                               in_backward=True, hold_gradients=True)
    causal_lm_loss(model, IDS, IDS, PerfOptions()).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert len(optimizer._held) == sum(1 for _ in model.parameters())
    optimizer.step()
    assert optimizer._held == []


def test_cuda_graphs_fall_back_to_compiled_layers_off_cuda():
    model = _model()
    options = PerfOptions.parse("fused-experts+cuda-graphs")
    notes = apply_optimizations(model, options)
    assert options.compile == "layers"
    assert any("CUDA graphs need one CUDA device" in n for n in notes)


def test_compiled_layers_with_fused_experts_are_one_graph_and_equal_the_hf_forward():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    reference, optimized = _model(), _model()
    ref_step, ref_grads = _loss_and_grads(reference, "base")
    step, grads = _loss_and_grads(optimized, "loss=chunked+fused-experts+compile-all")
    # the expert MLP is one custom op and the router logits are captured without the ContextVar: no break
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] >= 1
    assert step.aux is not None and abs(step.aux.item() - ref_step.aux.item()) <= 1e-5 * abs(ref_step.aux.item())
    assert abs(step.loss.item() - ref_step.loss.item()) <= 1e-5 * abs(ref_step.loss.item())
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert _relative(grad, ref_grads[name]) <= 1e-5, name


def test_every_layer_is_compiled_past_dynamos_default_recompile_limit():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe(num_hidden_layers=10, output_router_logits=True))
    options = PerfOptions.parse("loss=chunked+fused-experts+compile-all")
    apply_optimizations(model, options)
    for _ in range(2):
        causal_lm_loss(model, IDS, IDS, options).loss.backward()
    # one graph per layer (each sees a longer router-logits list); none left to run eagerly past the limit of 8
    assert counters["stats"]["unique_graphs"] >= 10
    assert dict(counters["graph_break"]) == {}


def test_disable_compile_restores_eager_modules():
    model = _model()
    options = PerfOptions.parse("compile")
    notes = apply_optimizations(model, options)
    assert any("torch.compile" in n for n in notes)
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert disable_compile(model)
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    causal_lm_loss(model, IDS, IDS, options).loss.backward()  # runs eagerly


def test_liger_falls_back_with_a_note_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback")
    model = _model()
    notes = apply_optimizations(model, PerfOptions.parse("liger"))
    assert any("liger not importable" in n for n in notes)


def test_compiled_runs_leave_rmsnorm_to_inductor_instead_of_liger():
    import tiny_configs
    from trainer.models import MoEAutoModelForCausalLM

    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe())
    notes = apply_optimizations(model, PerfOptions.parse("liger+compile"))
    assert any("RMSNorm left to torch.compile" in note for note in notes)
    assert all(type(m).__name__ != "LigerRMSNorm" for m in model.modules())


def test_graphs_first_without_cuda_graphs_says_so():
    options = PerfOptions.parse("compile+graphs-first")
    assert options.graph_priority == "high"
    notes = apply_optimizations(_model(), options)
    assert any("graph_priority=high needs cuda-graphs" in note for note in notes)


def test_best_captures_graphs_at_high_priority_only_without_replicas():
    from trainer.parallel.replicate import REPLICA_GRADIENTS
    from trainer.perf import _set_graph_priority

    options = PerfOptions.parse("best")
    assert options.graph_priority == "auto"
    options.compile = "layers"  # CUDA graphs fell back (no GPU): auto says nothing
    assert _set_graph_priority(_model(), options) is None
    options.compile = "layers-graphs"
    replicated = _model()
    replicated.__dict__[REPLICA_GRADIENTS] = object()  # what trainer.parallel.replicate leaves on a replica
    assert "default priority" in _set_graph_priority(replicated, options)


def test_step_priority_is_settled_for_the_step_loop():
    """`step-first` asks for the step on a high-priority stream; `auto` only beside the overlapped optimizer and
    without replicas. Settled to "high" or "default" (what `step_stream` reads), with a note where it falls back."""
    from trainer.parallel.replicate import REPLICA_GRADIENTS
    from trainer.perf import _resolve_step_priority

    options = PerfOptions.parse("step-first")
    assert options.step_priority == "high"
    assert "needs CUDA" in _resolve_step_priority(_model(), options)  # this machine's model is on the CPU
    assert options.step_priority == "default"
    options = PerfOptions.parse("opt-in-bwd+step_priority=auto")
    assert _resolve_step_priority(_model(), options) is None and options.step_priority == "default"
    replicated = _model()
    replicated.__dict__[REPLICA_GRADIENTS] = object()
    options = PerfOptions.parse("opt-overlap+step_priority=auto")
    assert "default priority" in _resolve_step_priority(replicated, options)
    assert options.step_priority == "default"


def test_step_stream_leaves_cpu_steps_on_the_current_stream():
    from trainer.step_optimizer import step_stream

    options = PerfOptions.parse("step-first")
    with step_stream(options, torch.device("cpu")):
        ids = torch.ones(2, 3)
    assert ids.sum() == 6


def test_static_rope_reuses_fixed_address_buffers_and_trains_like_without():
    """`static-rope`: the rotary (cos, sin) come back in the same two buffers every call, marked static for the
    CUDA graphs, with the embedding's own values; compiled layers train exactly as without, with no recompile
    after the first step."""
    from torch._dynamo.utils import counters

    model = _model()
    rotary = model.model.rotary_emb
    x, positions = torch.randn(2, 20, 32), torch.arange(20).expand(2, 20)
    expected = rotary(x, positions)
    options = PerfOptions.parse("fused-experts+static-rope")
    apply_optimizations(model, options)
    assert "rotary embeddings in fixed-address buffers (1 modules)" in options.notes
    first = rotary(x, positions)
    second = rotary(x, positions + 3)
    assert all(a is b for a, b in zip(first, second))
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in first)
    assert torch.equal(second[0], rotary.__class__.forward(rotary, x, positions + 3)[0])
    assert torch.equal(rotary(x, positions)[1], expected[1])

    losses, graphs = {}, {}
    for spec in ("fused-experts+compile-all+opt-in-bwd", "fused-experts+compile-all+opt-in-bwd+static-rope"):
        torch._dynamo.reset()
        counters.clear()
        model = _model()
        options = PerfOptions.parse(spec)
        apply_optimizations(model, options)
        _, losses[spec] = train_steps(model, options, IDS, 3, lr=1e-2)
        graphs[spec] = counters["stats"]["unique_graphs"]
    static = "fused-experts+compile-all+opt-in-bwd+static-rope"
    assert losses[static] == losses["fused-experts+compile-all+opt-in-bwd"]
    assert graphs[static] == graphs["fused-experts+compile-all+opt-in-bwd"]  # no recompile for the buffers
