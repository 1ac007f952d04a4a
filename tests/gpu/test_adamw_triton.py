"""On a GPU: the Triton AdamW kernel (`trainer.kernels.adamw`) makes the same update as `torch._fused_adamw_`.

Run: `pytest -m gpu tests/gpu/test_adamw_triton.py`. The formula is the same, but the bias corrections come from
fp32 exp2 instead of torch's pow, and the compilers order the fp32 arithmetic differently. One step's bias
correction one ulp apart moves every element's update by a hair, so at some steps about half of the elements round
to the neighbouring value (measured on an H200: 47% of the elements after 3 steps; fp32 up to 5.4e-8 absolute,
bf16 up to 2**-9 at values near 0.5). Tolerances: every element within 1e-6 absolute + 1e-5 relative (fp32) or
2**-8 absolute + 2**-7 relative (bf16, one rounding step). Training 3 steps with either kernel: losses within 1e-3
relative, each parameter within 1e-2 relative norm, after the backward (the step's device-side skip flag read by
the kernel) and overlapped in the backward.
"""

from __future__ import annotations

import pytest
import torch

from gpu_training import train_tiny_moe
from trainer.kernels import adamw as adamw_kernel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _state(numel: int, dtype: torch.dtype, seed: int):
    g = torch.Generator("cuda").manual_seed(seed)
    param = torch.randn(numel, device="cuda", generator=g).to(dtype)
    return param, torch.zeros_like(param), torch.zeros_like(param)


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = (2.0 ** -7, 2.0 ** -8) if dtype == torch.bfloat16 else (1e-5, 1e-6)
    torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("numel", [1, 4095, 3 * 4096 + 7, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_torch_fused_adamw(numel, dtype):
    ours = _state(numel, dtype, 0)
    reference = tuple(t.clone() for t in ours)
    step_ours = torch.zeros((), device="cuda")
    step_reference = torch.zeros((), device="cuda")
    for i in range(3):
        grad = torch.randn(numel, device="cuda", generator=torch.Generator("cuda").manual_seed(10 + i)).to(dtype)
        step_ours += 1
        step_reference += 1
        adamw_kernel.adamw_(*ours[:1], grad, *ours[1:], step_ours, **HYPER)
        torch._fused_adamw_([reference[0]], [grad], [reference[1]], [reference[2]], [], [step_reference],
                            lr=HYPER["lr"], beta1=HYPER["beta1"], beta2=HYPER["beta2"], eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], amsgrad=False, maximize=False)
    for a, b in zip(ours, reference):
        _close(a, b, dtype)


def test_master_copy_gets_bf16_gradients_and_writes_the_bf16_weight():
    master, exp_avg, exp_avg_sq = _state(10_000, torch.float32, 0)
    weight = master.to(torch.bfloat16)
    reference = master.clone(), exp_avg.clone(), exp_avg_sq.clone()
    grad = torch.randn(10_000, device="cuda").to(torch.bfloat16)
    step = torch.ones((), device="cuda")
    adamw_kernel.adamw_(master, grad, exp_avg, exp_avg_sq, step, shadow=weight, **HYPER)
    torch._fused_adamw_([reference[0]], [grad.float()], [reference[1]], [reference[2]], [], [step.clone()],
                        lr=HYPER["lr"], beta1=HYPER["beta1"], beta2=HYPER["beta2"], eps=HYPER["eps"],
                        weight_decay=HYPER["weight_decay"], amsgrad=False, maximize=False)
    _close(master, reference[0], torch.float32)
    assert torch.equal(weight, master.to(torch.bfloat16))


@pytest.mark.parametrize("skip", [0.0, 1.0], ids=["finite", "skipped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_skip_flag_on_the_device_turns_the_update_off_and_nothing_else(skip, dtype):
    """`skip` (the step's non-finite flag, read by the kernel): 1 leaves parameter, moments and shadow exactly as
    they were; 0 makes the update without the flag, exactly (the same arithmetic)."""
    flagged, plain = _state(4095, dtype, 0), _state(4095, dtype, 0)
    shadow = flagged[0].to(torch.bfloat16)
    before = tuple(t.clone() for t in flagged), shadow.clone()
    grad = torch.randn(4095, device="cuda", generator=torch.Generator("cuda").manual_seed(3)).to(dtype)
    step = torch.ones((), device="cuda")
    adamw_kernel.adamw_(flagged[0], grad, *flagged[1:], step, shadow=shadow, skip=torch.full((), skip, device="cuda"),
                        **HYPER)
    adamw_kernel.adamw_(plain[0], grad, *plain[1:], step, **HYPER)
    if skip:
        assert all(torch.equal(a, b) for a, b in zip(flagged, before[0])) and torch.equal(shadow, before[1])
    else:
        assert all(torch.equal(a, b) for a, b in zip(flagged, plain))
        assert torch.equal(shadow, flagged[0].to(torch.bfloat16))


@pytest.mark.parametrize("spec", [("optimizer=after-backward",), ("optimizer=overlap",)],
                         ids=["after-backward", "overlap"])
def test_training_with_the_triton_kernel_follows_torchs_kernel(spec):
    reference, reference_losses, _, _ = train_tiny_moe(spec, steps=3, apply=False)
    model, losses, optimizer, _ = train_tiny_moe(spec + ("adamw=triton",), steps=3, apply=False)
    assert optimizer.triton_kernel
    assert losses == pytest.approx(reference_losses, rel=1e-3)
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        a, b = a.detach().float(), b.detach().float()
        assert ((b - a).norm() / a.norm().clamp_min(1e-30)).item() <= 1e-2, name
