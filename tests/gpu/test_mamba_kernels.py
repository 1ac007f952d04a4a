"""On a GPU with causal-conv1d and mamba-ssm installed: the fused Mamba2 kernel path equals the PyTorch reference.

Run: `pytest -m gpu tests/gpu/test_mamba_kernels.py` after bench/device/build_mamba.sh and installing its wheels.
Everything in bf16 parameters and activations; relative error ||kernel - reference|| / ||reference|| <= 1e-2
(bf16 keeps 8 mantissa bits, ~4e-3 per rounding; the two paths round at different places: the kernel keeps the
conv output and the scan's chunk states in bf16/fp32 mixes, the reference scans in fp32).
"""

from __future__ import annotations

import copy

import pytest
import torch

import tiny_configs
from trainer.kernels import mamba as mamba_kernels
from trainer.models import MoEAutoModelForCausalLM
from trainer.models.mamba_mixer import kernel_forward, reference_forward, seq_idx_from_position_ids, set_implementation

pytestmark = pytest.mark.gpu

TOLERANCE = 1e-2


@pytest.fixture(scope="module", autouse=True)
def kernels():
    available, line = mamba_kernels.status()
    if not available:
        pytest.skip(line)
    return mamba_kernels.load()


def _small_config(**overrides):
    """Kernel-friendly sizes (channels multiples of 8, head_dim 32, state 32, two chunks of 64 per 128 tokens)."""
    sizes = dict(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
        mamba_num_heads=8, mamba_head_dim=32, n_groups=2, ssm_state_size=32, chunk_size=64, n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=128, moe_shared_expert_intermediate_size=256,
        layers_block_type=["mamba", "moe", "attention", "mamba", "moe", "mamba"],
    )
    sizes.update(overrides)
    return tiny_configs.nemotron_h(**sizes)


def _model():
    torch.manual_seed(0)
    return MoEAutoModelForCausalLM.from_config(_small_config(), dtype=torch.bfloat16).cuda().train()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _packed_positions(lengths, rows):
    row = torch.cat([torch.arange(n) for n in lengths])
    return row.expand(rows, -1).cuda()


@pytest.mark.parametrize("packed", [False, True])
def test_mixer_kernel_path_matches_reference_in_outputs_and_gradients(kernels, packed):
    mixer = _model().model.layers[0].mixer
    x = torch.randn(2, 256, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    seq_idx = seq_idx_from_position_ids(_packed_positions([100, 29, 127], 2)) if packed else None

    results = []
    paths = (lambda: kernel_forward(mixer, x, seq_idx, kernels), lambda: reference_forward(mixer, x, None, seq_idx))
    for forward in paths:
        mixer.zero_grad(set_to_none=True)
        x.grad = None
        y = forward()
        y.float().square().mean().backward()
        grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
        results.append((y.detach(), x.grad.clone(), grads))
    (y_k, dx_k, g_k), (y_r, dx_r, g_r) = results
    assert _relative(y_k, y_r) <= TOLERANCE
    assert _relative(dx_k, dx_r) <= TOLERANCE
    for name in g_r:
        assert _relative(g_k[name], g_r[name]) <= TOLERANCE, name


def test_model_kernel_path_matches_reference_logits_and_loss():
    model = _model()
    ids = torch.randint(0, tiny_configs.VOCAB, (2, 256), device="cuda")
    outputs = {}
    for implementation in ("kernel", "reference"):
        set_implementation(model, implementation)
        outputs[implementation] = model(ids, labels=ids, use_cache=False)
    assert _relative(outputs["kernel"].logits, outputs["reference"].logits) <= TOLERANCE
    kernel_loss, reference_loss = outputs["kernel"].loss.item(), outputs["reference"].loss.item()
    assert abs(kernel_loss - reference_loss) <= TOLERANCE * reference_loss


def test_kernel_path_keeps_packed_samples_apart():
    model = _model()
    set_implementation(model, "kernel")
    lengths = [100, 29, 127]
    samples = [torch.randint(0, tiny_configs.VOCAB, (1, n), device="cuda") for n in lengths]
    with torch.no_grad():
        packed = model(torch.cat(samples, dim=1), position_ids=_packed_positions(lengths, 1), use_cache=False).logits
        alone = [model(s, position_ids=torch.arange(s.shape[1], device="cuda")[None], use_cache=False).logits
                 for s in samples]
        alone = torch.cat(alone, dim=1)
    assert _relative(packed, alone) <= TOLERANCE


def test_transformers_native_model_runs_on_the_same_kernels():
    """The benchmark's "native with kernels" row: transformers' own mixer, the kernels found through mamba_ssm."""
    from transformers import AutoModelForCausalLM

    assert mamba_kernels.expose_to_transformers()
    ours = _model()
    set_implementation(ours, "kernel")
    native = AutoModelForCausalLM.from_config(copy.deepcopy(_small_config()), dtype=torch.bfloat16).cuda().train()
    native.load_state_dict(ours.state_dict())
    ids = torch.randint(0, tiny_configs.VOCAB, (2, 256), device="cuda")
    with torch.no_grad():
        ours_logits = ours(ids, use_cache=False).logits
        native_logits = native(ids, use_cache=False).logits
    assert _relative(native_logits, ours_logits) <= TOLERANCE
