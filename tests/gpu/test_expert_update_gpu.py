"""On a GPU: the experts' weight-gradient GEMM with the AdamW update in its epilogue (Triton,
`trainer.kernels.expert_update`) against the grouped weight-gradient GEMM + `torch._fused_adamw_`, and training with
the update inside the experts' backward (eager, compiled, CUDA graphs) against the optimizer's hooks.

Run: `pytest -m gpu tests/gpu/test_expert_update_gpu.py`. Tolerances: fp32 within 1e-5 relative (norm); bf16
within 1e-2 relative (norm) for the states and 2e-3 for the weights after 3 updates: the GEMMs accumulate in another
order, so some gradients round to the neighbouring bf16 value. Training: losses within 1e-2 relative, parameters
within 1e-2 relative (norm) after 3 steps.
"""

from __future__ import annotations

import pytest
import torch

from gpu_training import train_tiny_moe
from trainer.kernels import expert_update
from trainer.moe.grouped_gemm import grouped_mm_weight_grad

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernel_equals_weight_gradient_then_adamw(dtype):
    assert expert_update.triton_available()
    g = torch.Generator("cuda").manual_seed(0)
    experts, P, Q = 8, 200, 136
    counts = torch.tensor([0, 1, 63, 64, 65, 300, 7, 500])
    offsets = counts.cumsum(0).to(torch.int32).cuda()
    rows = int(counts.sum())
    weight = torch.randn(experts, P, Q, device="cuda", generator=g).to(dtype)
    ours = [weight, torch.zeros_like(weight), torch.zeros_like(weight)]
    reference = [t.clone() for t in ours]
    step = torch.ones((), device="cuda")
    update = expert_update.ExpertUpdate({}, step, 1e-3, 0.9, 0.95, 1e-8, 0.1)
    for _ in range(3):
        a = torch.randn(rows, P, device="cuda", generator=g).to(dtype)
        b = torch.randn(rows, Q, device="cuda", generator=g).to(dtype)
        expert_update.weight_grad_adamw_(a, b, offsets, *ours, update)
        grad = grouped_mm_weight_grad(a, b, offsets, experts, force_loop=True).to(dtype)  # per-expert matmuls
        torch._fused_adamw_([reference[0]], [grad], [reference[1]], [reference[2]], [], [step], amsgrad=False,
                            maximize=False, **update.hyper())
        step += 1
    bounds = (1e-5, 1e-5, 1e-5) if dtype == torch.float32 else (2e-3, 1e-2, 1e-2)
    for name, x, y, bound in zip(("weight", "exp_avg", "exp_avg_sq"), ours, reference, bounds):
        assert _relative(x, y) <= bound, name


@pytest.mark.parametrize("spec", ["fused-experts+opt-in-bwd", "fused-experts+opt-overlap+compile-all",
                                  "fused-experts+opt-overlap+cuda-graphs"])
def test_training_with_the_update_in_the_experts_backward_follows_the_hooks(spec):
    torch._dynamo.reset()
    reference, reference_losses, _, _ = train_tiny_moe(spec, steps=3)
    torch._dynamo.reset()
    model, losses, _, options = train_tiny_moe(spec + "+fused-update", steps=3)
    assert any("updated inside their backward" in note for note in options.notes), options.notes
    assert losses == pytest.approx(reference_losses, rel=1e-2)
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        assert _relative(b.detach(), a.detach()) <= 1e-2, name
