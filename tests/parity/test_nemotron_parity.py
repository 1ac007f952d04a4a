"""Nemotron-H through the fast path computes what transformers computes, and packed samples stay apart.

Reference: transformers' NemotronHForCausalLM with eager experts, its own router and its pure-torch Mamba2 path.
Tolerances (float32, CPU): logits max-abs-diff <= 1e-5; loss and every parameter gradient within 1e-5 relative.
The differences come from summation order only (K-way combine, grouped GEMM loop, the SSD scan's einsums), which
moves float32 results by ~1e-6.
"""

from __future__ import annotations

import copy

import pytest
import tiny_configs
import torch
from parity_checks import assert_same_function, relative
from transformers import AutoModelForCausalLM

from trainer.models import MoEAutoModelForCausalLM
from trainer.models.mamba_mixer import seq_idx_from_position_ids

# parameters transformers initialises with meaning (SSM decay, skip, time-step bias, norms): kept as initialised
_STRUCTURED = ("norm", "A_log", "dt_bias", ".D")


def _randomise(model):
    for name, param in model.named_parameters():
        if not any(part in name for part in _STRUCTURED):
            torch.nn.init.normal_(param, std=0.2)
    for name, buffer in model.named_buffers():  # a non-zero correction bias changes which experts are chosen
        if name.endswith("e_score_correction_bias"):
            buffer.normal_(std=0.1)


def _pair(config):
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), experts_implementation="eager")
    _randomise(reference)
    fast = MoEAutoModelForCausalLM.from_config(config)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def _run(model, ids, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, use_cache=False, **kwargs)
    out.loss.backward()
    return out


def _assert_same_function(reference, fast, ids, **fast_kwargs):
    """The parity check; returns the checked parameters by short name (mixer params keep their path below `mixer.`)."""
    names = assert_same_function(reference, fast, _run(reference, ids), _run(fast, ids, **fast_kwargs))
    return {name.split(".")[-1] if "mixer" not in name else name.split("mixer.")[1] for name in names}


@pytest.mark.parametrize("positions", ["implicit", "explicit"])
def test_every_layer_type_matches_transformers_in_logits_loss_and_gradients(positions):
    config = tiny_configs.nemotron_h()
    assert config.hybrid_override_pattern == "ME*-EM"  # Mamba2, MoE, attention, dense MLP
    reference, fast = _pair(config)
    ids = torch.randint(0, tiny_configs.VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    kwargs = {"position_ids": torch.arange(24).expand(2, -1)} if positions == "explicit" else {}
    checked = _assert_same_function(reference, fast, ids, **kwargs)
    for parameter in ("experts.up_proj", "experts.down_proj", "gate.weight", "shared_experts.up_proj.weight",
                      "in_proj.weight", "conv1d.weight", "A_log", "D", "dt_bias", "norm.weight", "q_proj.weight"):
        assert parameter in checked, parameter


def test_latent_moe_projections_match_transformers():
    reference, fast = _pair(tiny_configs.nemotron_h(moe_latent_size=16))
    assert fast.model.layers[1].mixer.experts.up_proj.shape == (8, 16, 16)  # experts work in the latent size
    ids = torch.randint(0, tiny_configs.VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    checked = _assert_same_function(reference, fast, ids)
    assert "fc1_latent_proj.weight" in checked and "fc2_latent_proj.weight" in checked


def test_group_limited_routing_matches_transformers():
    reference, fast = _pair(tiny_configs.nemotron_h(n_group=4, topk_group=2))
    ids = torch.randint(0, tiny_configs.VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    _assert_same_function(reference, fast, ids)


def test_fast_path_is_actually_used():
    _, fast = _pair(tiny_configs.nemotron_h())
    assert fast.config._experts_implementation == "moe_fast"
    routers = [m for m in fast.modules() if type(m).__name__ == "NemotronHTopkRouter"]
    mixers = [m for m in fast.modules() if type(m).__name__ == "NemotronHMamba2Mixer"]
    assert len(routers) == 2 and all(hasattr(r, "moe_router_spec") for r in routers)
    assert len(mixers) == 2 and all(m.forward.__func__.__name__ == "mixer_forward" for m in mixers)


def _packed_batch():
    """Two rows of 24 tokens: row 0 packs samples of 7, 10 and 7 tokens, row 1 packs 13 and 11."""
    generator = torch.Generator().manual_seed(4)
    rows = [[7, 10, 7], [13, 11]]
    samples = [[torch.randint(0, tiny_configs.VOCAB, (1, n), generator=generator) for n in row] for row in rows]
    ids = torch.cat([torch.cat(row, dim=1) for row in samples])
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    return samples, ids, positions


def test_packed_rows_equal_their_samples_run_one_by_one():
    _, fast = _pair(tiny_configs.nemotron_h())
    samples, ids, positions = _packed_batch()
    with torch.no_grad():
        packed = fast(ids, position_ids=positions).logits
        for b, row in enumerate(samples):
            alone = torch.cat([fast(s, position_ids=torch.arange(s.shape[1])[None]).logits for s in row], dim=1)
            assert (packed[b] - alone[0]).abs().max().item() <= 1e-5


def test_packed_gradients_equal_the_sum_over_samples():
    _, fast = _pair(tiny_configs.nemotron_h())
    samples, ids, positions = _packed_batch()
    fast.zero_grad(set_to_none=True)
    logits = fast(ids, position_ids=positions).logits
    logits.float().square().mean(dim=-1).sum().backward()  # a per-token objective: sums over samples
    packed_grads = {n: p.grad.clone() for n, p in fast.named_parameters() if p.grad is not None}

    fast.zero_grad(set_to_none=True)
    for row in samples:
        for sample in row:
            logits = fast(sample, position_ids=torch.arange(sample.shape[1])[None]).logits
            logits.float().square().mean(dim=-1).sum().backward()
    for name, param in fast.named_parameters():
        if param.grad is not None and param.grad.norm() > 0:
            assert relative(packed_grads[name], param.grad) <= 1e-5, name


def test_transformers_own_torch_path_lets_packed_samples_leak():
    """Why the mixer is replaced: without seq_idx the Mamba2 state flows from one sample into the next."""
    reference, _ = _pair(tiny_configs.nemotron_h())
    samples, ids, positions = _packed_batch()
    with torch.no_grad():
        packed = reference(ids[:1], position_ids=positions[:1], use_cache=False).logits
        second = reference(samples[0][1], position_ids=torch.arange(10)[None], use_cache=False).logits
    assert (packed[0, 7:17] - second[0]).abs().max().item() > 1e-3


def test_seq_idx_numbers_samples_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert seq_idx_from_position_ids(positions).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2], [0] * 9]
    assert seq_idx_from_position_ids(positions).dtype == torch.int32
