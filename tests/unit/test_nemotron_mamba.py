"""The Mamba2 pieces on their own: the reference SSD scan, the kernel loader, and what the kernel path is handed."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import tiny_configs
from trainer.kernels import mamba as mamba_kernels
from trainer.models import MoEAutoModelForCausalLM
from trainer.models.mamba_mixer import set_implementation, ssd_scan_reference


def _sequential_scan(x, dt, A, B, C, D, dt_bias):
    """h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t;  y_t = C_t h_t + D x_t  (one token at a time, fp64)."""
    batch, length, heads, head_dim = x.shape
    repeat = heads // B.shape[2]
    B, C = B.repeat_interleave(repeat, dim=2), C.repeat_interleave(repeat, dim=2)
    dt = F.softplus(dt + dt_bias)
    state = torch.zeros(batch, heads, head_dim, B.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(length):
        decay = torch.exp(A * dt[:, t])[:, :, None, None]
        state = decay * state + (dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, :, None, :])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]) + D[:, None] * x[:, t])
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("length", [5, 16, 21])  # shorter than, equal to, and not a multiple of the chunks
def test_chunked_reference_scan_equals_the_token_by_token_recurrence(length):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, length, 4, 3, generator=g, dtype=torch.float64)
    dt = torch.randn(2, length, 4, generator=g, dtype=torch.float64)
    A = -torch.rand(4, generator=g, dtype=torch.float64) * 2
    B = torch.randn(2, length, 2, 5, generator=g, dtype=torch.float64)
    C = torch.randn(2, length, 2, 5, generator=g, dtype=torch.float64)
    D, dt_bias = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    chunked = ssd_scan_reference(x, dt, A, B, C, 8, D, dt_bias, (0.0, float("inf")))
    expected = _sequential_scan(x, dt, A, B, C, D, dt_bias)
    assert torch.allclose(chunked.double(), expected, rtol=1e-5, atol=1e-5)  # the reference computes in fp32


@pytest.fixture
def fake_kernel_packages(tmp_path, monkeypatch):
    """mamba_ssm as MAMBA_SKIP_CUDA_BUILD leaves it (its __init__ needs selective_scan_cuda) and a causal_conv1d."""
    files = {
        "mamba_ssm/__init__.py": "__version__ = '2.3.0'\nimport selective_scan_cuda\n",
        "mamba_ssm/ops/__init__.py": "",
        "mamba_ssm/ops/triton/__init__.py": "",
        "mamba_ssm/ops/triton/ssd_combined.py": """
            from causal_conv1d import causal_conv1d_fn as causal_conv1d_fwd_function
            CALLS = []
            def mamba_split_conv1d_scan_combined(
                zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size, initial_states=None, seq_idx=None,
                dt_limit=(0.0, float("inf")), return_final_states=False, activation="silu", rmsnorm_weight=None,
                rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None, ngroups=1,
                norm_before_gate=True,
            ):
                kwargs = dict(D=D, chunk_size=chunk_size, seq_idx=seq_idx, dt_limit=dt_limit, headdim=headdim,
                              ngroups=ngroups, norm_before_gate=norm_before_gate, rmsnorm_weight=rmsnorm_weight)
                CALLS.append((zxbcdt, (conv1d_weight, conv1d_bias, dt_bias, A), kwargs))
                return zxbcdt.new_zeros(*zxbcdt.shape[:2], outproj_weight.shape[0])
            def mamba_chunk_scan_combined(*args, **kwargs):
                raise NotImplementedError
            """,
        "causal_conv1d/__init__.py": "def causal_conv1d_fn(*args, **kwargs):\n    raise NotImplementedError\n",
    }
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(textwrap.dedent(text))
    # imported before the fakes are on the path: transformers picks its kernels at import time
    from transformers.models.nemotron_h import modeling_nemotron_h as hf

    for attr in mamba_kernels._TRANSFORMERS_FUNCTIONS:  # expose_to_transformers() rewraps them: restore after
        monkeypatch.setattr(hf, attr, getattr(hf, attr))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    mamba_kernels.reset_for_tests()
    yield
    for name in [n for n in sys.modules if n.split(".")[0] in ("mamba_ssm", "causal_conv1d")]:
        del sys.modules[name]
    mamba_kernels.reset_for_tests()


def test_kernels_load_without_running_mamba_ssms_package_init(fake_kernel_packages):
    kernels = mamba_kernels.load()
    assert kernels is not None
    assert kernels.split_conv1d_scan_combined.__module__ == "mamba_ssm.ops.triton.ssd_combined"
    assert "package __init__ bypassed" in kernels.detail and "selective_scan_cuda" in kernels.detail
    # what transformers' detection does: `import mamba_ssm`, then follow ops.triton.ssd_combined.<function>
    package = importlib.import_module("mamba_ssm")
    assert package.ops.triton.ssd_combined.mamba_split_conv1d_scan_combined is kernels.split_conv1d_scan_combined


def test_status_line_says_what_is_missing_and_what_falls_back(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    mamba_kernels.reset_for_tests()
    try:
        available, line = mamba_kernels.status()
    finally:
        mamba_kernels.reset_for_tests()
    assert not available
    assert line == "causal_conv1d and mamba_ssm not installed; " + mamba_kernels.FALLBACK


def test_transformers_native_mixer_finds_the_same_kernels(fake_kernel_packages):
    from transformers.models.nemotron_h import modeling_nemotron_h as hf

    assert mamba_kernels.expose_to_transformers()
    zxbcdt = torch.zeros(1, 3, 8)
    out = hf.mamba2_split_conv1d_scan_combined(zxbcdt, None, None, None, None, D=None, chunk_size=4,
                                               outproj_weight=torch.zeros(5, 2), unknown_kwarg=1)
    assert out.shape == (1, 3, 5)
    assert importlib.import_module("mamba_ssm.ops.triton.ssd_combined").CALLS


def test_kernel_path_gets_the_mixer_parameters_and_per_sample_seq_idx(fake_kernel_packages):
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.nemotron_h())
    set_implementation(model, "kernel")
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5, 6, 7]])
    model(torch.randint(0, tiny_configs.VOCAB, (2, 8)), position_ids=positions)

    calls = importlib.import_module("mamba_ssm.ops.triton.ssd_combined").CALLS
    assert len(calls) == 2  # one per Mamba2 layer
    mixer = model.model.layers[0].mixer
    zxbcdt, (conv_weight, conv_bias, dt_bias, A), kwargs = calls[0]
    assert zxbcdt.shape == (2, 8, mixer.in_proj.out_features)
    assert conv_weight.shape == (mixer.conv_dim, 4) and conv_bias is mixer.conv1d.bias and dt_bias is mixer.dt_bias
    assert torch.equal(A, -torch.exp(mixer.A_log.float()))
    assert kwargs["seq_idx"].dtype == torch.int32
    assert kwargs["seq_idx"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 2], [0] * 8]
    assert kwargs["D"] is mixer.D and kwargs["rmsnorm_weight"] is mixer.norm.weight
    assert kwargs["headdim"] == 8 and kwargs["ngroups"] == 2 and kwargs["norm_before_gate"] is False
    assert kwargs["dt_limit"] == mixer.time_step_limit and kwargs["chunk_size"] == 8
