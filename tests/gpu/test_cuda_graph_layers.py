"""On a GPU: compiled layers replayed as CUDA graphs (`cuda-graphs`) train exactly like the same compiled layers
launched kernel by kernel (`compile-all`), with the optimizer in backward on its side stream.

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
from trainer.models import MoEAutoModelForCausalLM
from trainer.perf import PerfOptions, apply_optimizations

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BASE = "loss=chunked+fused-experts+opt-overlap"


def _train(spec: str, steps: int = 5):
    torch._dynamo.reset()
    model, losses, _, options = train_tiny_moe(spec, steps=steps, num_hidden_layers=3)
    return model, losses, options.notes


def test_cuda_graph_layers_train_like_kernel_by_kernel_layers():
    from torch._dynamo.utils import counters

    reference, reference_losses, _ = _train(BASE + "+compile-all")
    counters.clear()
    graphed, losses, notes = _train(BASE + "+cuda-graphs")
    assert any("layers-graphs" in note for note in notes), notes
    skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k and "skip" in k}
    assert sum(skips.values()) == 0, skips
    for got, want in zip(losses, reference_losses):
        assert abs(got - want) <= 1e-3 * abs(want), (losses, reference_losses)
    for (name, a), (_, b) in zip(reference.named_parameters(), graphed.named_parameters()):
        assert ((b - a).norm() / a.norm().clamp_min(1e-30)).item() <= 1e-3, name
        assert b.grad is None, name


@pytest.mark.parametrize("defer", ["defer-head", "defer=1"])
def test_held_back_updates_with_cuda_graph_layers_train_like_without(defer):
    """`defer-head` / `defer=1` (the last layer then without CUDA graphs) under CUDA-graph layers and the Triton
    AdamW (the whole `best` optimizer path): same losses and parameters as without, within the tolerance above."""
    reference, reference_losses, _ = _train(BASE + "+cuda-graphs+triton-adamw")
    deferred, losses, notes = _train(BASE + "+cuda-graphs+triton-adamw+" + defer)
    assert any("held back to the next forward" in note for note in notes), notes
    for got, want in zip(losses, reference_losses):
        assert abs(got - want) <= 1e-3 * abs(want), (losses, reference_losses)
    for (name, a), (_, b) in zip(reference.named_parameters(), deferred.named_parameters()):
        assert ((b - a).norm() / a.norm().clamp_min(1e-30)).item() <= 1e-3, name


def test_fp32_weights_fall_back_to_compiled_layers_with_a_note():
    with torch.device("cuda"):
        model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe())
    options = PerfOptions.parse("fused-experts+cuda-graphs")
    notes = apply_optimizations(model, options)
    assert options.compile == "layers"
    assert any("bf16/fp16 weights" in note for note in notes)


def test_graphs_captured_at_high_priority_train_like_default_priority():
    """`graphs-first`: the layers' graphs are recorded on a high-priority stream (the manager that recorded them
    still holds it after training) and train as at the default priority, within the tolerance above."""
    from torch._inductor import cudagraph_trees

    reference, reference_losses, _ = _train(BASE + "+cuda-graphs+triton-adamw")
    first, losses, notes = _train(BASE + "+cuda-graphs+triton-adamw+graphs-first")
    assert "CUDA graphs captured on a high-priority stream" in notes, notes
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and manager.stream.priority < 0 and any(manager.roots.values())
    for got, want in zip(losses, reference_losses):
        assert abs(got - want) <= 1e-3 * abs(want), (losses, reference_losses)
    for (name, a), (_, b) in zip(reference.named_parameters(), first.named_parameters()):
        assert ((b - a).norm() / a.norm().clamp_min(1e-30)).item() <= 1e-3, name


def _copy_kernels_in_one_step(spec: str) -> tuple[list[float], int]:
    """5 steps, then one more under the profiler: (losses, bf16 multi-tensor copy kernels in that step)."""
    from torch.profiler import ProfilerActivity, profile

    from trainer.perf import causal_lm_loss

    torch._dynamo.reset()
    model, losses, optimizer, options = train_tiny_moe(spec, steps=5, num_hidden_layers=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 256), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(1))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        causal_lm_loss(model, ids, ids, options).loss.backward()
        optimizer.step()
        torch.cuda.synchronize()
    copies = sum(e.count for e in prof.key_averages() if "multi_tensor_apply" in e.key and "Copy" in e.key)
    return losses, copies


def test_static_rope_leaves_the_graph_inputs_in_place_and_trains_like_without():
    """`static-rope`: the layers' graphs read the rotary (cos, sin) from their fixed-address buffers instead of
    copying them in before each replay (fewer copy kernels per step), with the losses of the default within 1e-3."""
    from torch._dynamo.utils import counters

    spec = BASE + "+cuda-graphs+triton-adamw"
    reference_losses, reference_copies = _copy_kernels_in_one_step(spec)
    counters.clear()
    losses, copies = _copy_kernels_in_one_step(spec + "+static-rope")
    skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k and "skip" in k}
    assert sum(skips.values()) == 0, skips
    assert copies < reference_copies, (copies, reference_copies)
    for got, want in zip(losses, reference_losses):
        assert abs(got - want) <= 1e-3 * abs(want), (losses, reference_losses)
