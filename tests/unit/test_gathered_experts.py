"""The all-gather dispatcher's expert side: pairs whose expert lives on another rank never reach the output or the
gradients, even though their rows sit past the last offset where the fused grouped GEMM leaves whatever the
memory held (simulated here: those rows are filled with NaN after every grouped GEMM).

The experts module keeps only its first half of the experts (as rank 0 of two does); the reference is the whole
module on the unfused local path with the other half's routing weights set to 0. fp32 on CPU; tolerance 1e-5
relative (only the summation order differs). The two-rank parity of the whole dispatcher (collectives included)
is in tests/distributed (test_ep_fsdp_parity.py, test_replicate.py).
"""

from __future__ import annotations

import copy

import pytest
import torch
import trainer.kernels.fused_expert_mlp as fused_module
import trainer.moe.experts as experts_module
from tiny_experts import gpt_oss_experts, nemotron_experts, qwen3_experts
from trainer.moe.experts import fast_experts_forward, set_fused_experts
from trainer.parallel.allgather import GatheredTokens
from trainer.parallel.apply import rank_experts, stacked_expert_params

TOL = 1e-5


class _FirstHalfHere:
    """Rank 0 of two without the collectives: every token is already here, experts [0, E/2) are local."""

    name = "first-half"
    gathers_tokens = True

    def gather(self, x_TD, index_TK, weights_TK, num_experts):
        local = num_experts // 2
        keep_TK = index_TK < local
        return GatheredTokens(x_TD, torch.where(keep_TK, index_TK, local), torch.where(keep_TK, weights_TK, 0.0),
                              keep_TK, local)

    def scatter(self, out_TD):
        return out_TD


def _nan_past_last_offset(real):
    def grouped_mm(x_SK, w_EKN, offsets_E, **kwargs):
        out_SN = real(x_SK, w_EKN, offsets_E, **kwargs)
        out_SN[int(offsets_E[-1]):] = float("nan")
        return out_SN
    return grouped_mm


def _step(experts, x, index, weights):
    experts.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    w = weights.detach().requires_grad_(True)
    out = fast_experts_forward(experts, x, index, w)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)))
    return out.detach(), x.grad, w.grad, {n: p.grad for n, p in experts.named_parameters()}


@pytest.mark.parametrize("build", [qwen3_experts, nemotron_experts, gpt_oss_experts], ids=["swiglu", "relu2", "biased-custom-gate"])
def test_pairs_of_experts_elsewhere_never_leak_into_outputs_or_gradients(build, monkeypatch):
    whole = build()
    set_fused_experts(whole, False)
    half = copy.deepcopy(whole)
    for name, param in stacked_expert_params(half):
        setattr(half, name, torch.nn.Parameter(rank_experts(param, 0, 2)))
    half.moe_dispatcher = _FirstHalfHere()
    set_fused_experts(half, True)

    tokens, top_k, experts = 11, 2, whole.num_experts
    g = torch.Generator().manual_seed(1)
    index = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    index[0] = torch.tensor([experts - 1, experts - 2])  # a token with no expert here
    weights = torch.rand(tokens, top_k, generator=g)
    hidden = whole.down_proj.shape[-1] if getattr(whole, "is_transposed", False) else whole.down_proj.shape[1]
    x = torch.randn(tokens, hidden, generator=g)

    here = index < experts // 2
    ref = _step(whole, x, index, torch.where(here, weights, 0.0))
    monkeypatch.setattr(fused_module, "grouped_mm", _nan_past_last_offset(fused_module.grouped_mm))
    monkeypatch.setattr(experts_module, "grouped_mm", _nan_past_last_offset(experts_module.grouped_mm))
    got = _step(half, x, index, weights)

    for name, a, b in [("output", got[0], ref[0]), ("grad x", got[1], ref[1]),
                       ("grad weights (kept pairs)", got[2][here], ref[2][here])]:
        assert torch.isfinite(a).all(), name
        assert ((a - b).norm() / b.norm().clamp_min(1e-30)).item() <= TOL, name
    assert (got[2][~here] == 0).all(), "pairs of experts elsewhere get their gradient on the other rank"
    for name, grad in got[3].items():
        expected = rank_experts(ref[3][name], 0, 2)
        assert torch.isfinite(grad).all(), name
        assert ((grad - expected).norm() / expected.norm().clamp_min(1e-30)).item() <= TOL, name
    assert half.moe_last_tokens_per_expert.sum().item() == here.sum().item()
