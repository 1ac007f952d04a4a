"""On a GPU: compiled layers replayed as CUDA graphs (`perf.compile=layers-graphs`) train exactly like the same
compiled layers launched kernel by kernel (`compile=layers`), with the optimizer in backward on its side stream.

Run: `pytest -m gpu tests/gpu/test_cuda_graph_layers.py`. bf16 weights (the grouped GEMM's dtype; fp32 experts
cannot be captured and fall back with a note). Tolerance: 1e-3 relative on every loss and parameter after 5 steps:
the same kernels run in both, the graphs change only how they are launched, so anything beyond bf16 rounding of a
reordered reduction is a bug. Also checks that no layer fell back to plain launches (inductor's cudagraph skip
counter stays at zero).
"""

from __future__ import annotations

import pytest
import torch

import tiny_configs
from gpu_training import train_tiny_moe
from perf_options import perf_options
from trainer.models import MoEAutoModelForCausalLM
from trainer.perf import apply_optimizations

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BASE = ("fused_ce=on", "fused_experts=on", "optimizer=overlap")
GRAPHS = BASE + ("compile=layers-graphs", "adamw=triton")  # the whole fast optimizer path


def _train(spec: tuple[str, ...], steps: int = 5):
    torch._dynamo.reset()
    model, losses, _, options = train_tiny_moe(spec, steps=steps, num_hidden_layers=3)
    return model, losses, options.notes


def test_cuda_graph_layers_train_like_kernel_by_kernel_layers():
    from torch._dynamo.utils import counters

    reference, reference_losses, _ = _train(BASE + ("compile=layers",))
    counters.clear()
    graphed, losses, notes = _train(BASE + ("compile=layers-graphs",))
    assert any("layers-graphs" in note for note in notes), notes
    skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k and "skip" in k}
    assert sum(skips.values()) == 0, skips
    for got, want in zip(losses, reference_losses):
        assert abs(got - want) <= 1e-3 * abs(want), (losses, reference_losses)
    for (name, a), (_, b) in zip(reference.named_parameters(), graphed.named_parameters()):
        assert ((b - a).norm() / a.norm().clamp_min(1e-30)).item() <= 1e-3, name
        assert b.grad is None, name


@pytest.mark.parametrize("defer", ["defer=head", "defer=1"])
def test_held_back_updates_with_cuda_graph_layers_train_like_without(defer):
    """`defer=head` / `defer=1` (the last layer then without CUDA graphs) under CUDA-graph layers and the Triton
    AdamW: same losses and parameters as without, within the tolerance above."""
    reference, reference_losses, _ = _train(GRAPHS)
    deferred, losses, notes = _train(GRAPHS + (defer,))
    assert any("held back to the next forward" in note for note in notes), notes
    for got, want in zip(losses, reference_losses):
        assert abs(got - want) <= 1e-3 * abs(want), (losses, reference_losses)
    for (name, a), (_, b) in zip(reference.named_parameters(), deferred.named_parameters()):
        assert ((b - a).norm() / a.norm().clamp_min(1e-30)).item() <= 1e-3, name


def test_fp32_weights_fall_back_to_compiled_layers_with_a_note():
    with torch.device("cuda"):
        model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe())
    options = perf_options("fused_experts=on", "compile=layers-graphs", device="cuda")
    notes = apply_optimizations(model, options)
    assert options.compile == "layers"
    assert any("bf16/fp16 expert weights" in note for note in notes)


def test_graphs_captured_at_high_priority_train_like_default_priority():
    """`graph_priority=high`: the layers' graphs are recorded on a high-priority stream (the manager that recorded them
    still holds it after training) and train as at the default priority, within the tolerance above."""
    from torch._inductor import cudagraph_trees

    reference, reference_losses, _ = _train(GRAPHS)
    first, losses, notes = _train(GRAPHS + ("graph_priority=high",))
    assert "CUDA graphs captured on a high-priority stream" in notes, notes
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and manager.stream.priority < 0 and any(manager.roots.values())
    for got, want in zip(losses, reference_losses):
        assert abs(got - want) <= 1e-3 * abs(want), (losses, reference_losses)
    for (name, a), (_, b) in zip(reference.named_parameters(), first.named_parameters()):
        assert ((b - a).norm() / a.norm().clamp_min(1e-30)).item() <= 1e-3, name



@pytest.mark.parametrize("optimizer, max_grad_norm", [("optimizer=overlap", 0.0), ("optimizer=after-backward", 1.0)])
def test_lora_adapters_with_cuda_graph_layers_train_like_kernel_by_kernel_layers(optimizer, max_grad_norm):
    """A bf16 base with fp32 LoRA adapters on attention and experts, every layer checkpointed (the B4-lora
    configuration), keeps its CUDA-graph layers, beside the overlapped optimizer or AdamW after the backward with
    clipping, and trains like the same compiled layers launched kernel by kernel (tolerance above); the frozen base
    is the same in both, bit for bit."""
    from trainer.config import LoraConfig
    from trainer.lora import apply_lora
    from trainer.parallel.checkpointing import apply_checkpointing

    def adapt(model):
        apply_lora(model, LoraConfig(enabled=True, rank=8, alpha=16, targets=["attention", "experts"]))
        apply_checkpointing(model, "full")  # as trainer.parallel does, before the perf patches

    spec = ("fused_ce=on", "fused_experts=on", optimizer)
    runs = []
    for compile_mode in ("compile=layers", "compile=layers-graphs"):
        torch._dynamo.reset()
        runs.append(train_tiny_moe(spec + (compile_mode,), steps=5, num_hidden_layers=3, prepare=adapt,
                                   max_grad_norm=max_grad_norm))
    (reference, reference_losses, _, _), (graphed, losses, _, options) = runs
    assert options.compile == "layers-graphs", options.notes
    for got, want in zip(losses, reference_losses):
        assert abs(got - want) <= 1e-3 * abs(want), (losses, reference_losses)
    for (name, a), (_, b) in zip(reference.named_parameters(), graphed.named_parameters()):
        if a.requires_grad:
            assert ((b - a).norm() / a.norm().clamp_min(1e-30)).item() <= 1e-3, name
        else:
            assert torch.equal(a, b), name
