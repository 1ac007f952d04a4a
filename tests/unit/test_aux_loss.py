"""trainer.models.aux_loss: the sync-free router load-balancing loss equals transformers' `load_balancing_loss_func`
(fp32, CPU; tolerance 1e-6 relative: only the counting op differs, and counts are exact in fp32) and is installed
only where it agrees."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import tiny_configs
from trainer.models import MoEAutoModelForCausalLM
from trainer.models.aux_loss import sync_free_load_balancing_loss, use_sync_free_aux_loss

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]


def _original(family: str):
    """transformers' own function, from a fresh import of the family's modeling module (ours may be installed)."""
    name = f"transformers.models.{family}.modeling_{family}"
    saved = importlib.import_module(name)
    del sys.modules[name]
    try:
        return importlib.import_module(name).load_balancing_loss_func
    finally:
        sys.modules[name] = saved


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("masked", [False, True])
def test_equals_transformers_loss_with_and_without_padding(family, masked):
    g = torch.Generator().manual_seed(1)
    logits = tuple(torch.randn(2 * 9, 16, generator=g, requires_grad=True) for _ in range(4))
    mask = (torch.rand(2, 9, generator=g) > 0.25).long() if masked else None
    want = _original(family)(logits, 16, 4, mask)
    got = sync_free_load_balancing_loss(logits, 16, 4, mask)
    assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
    grads_got = torch.autograd.grad(got, logits)
    grads_want = torch.autograd.grad(want, logits)
    for a, b in zip(grads_got, grads_want):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_installed_in_the_models_module_and_the_loss_is_unchanged():
    torch.manual_seed(0)
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.mixtral(output_router_logits=True,
                                                                     router_aux_loss_coef=0.02))
    ids = torch.randint(0, tiny_configs.VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    module = sys.modules[type(model).__module__]
    original = _original("mixtral")
    module.load_balancing_loss_func = original
    before = model(ids, labels=ids).aux_loss
    assert use_sync_free_aux_loss(model) == "router aux loss without host synchronisation"
    assert module.load_balancing_loss_func is sync_free_load_balancing_loss
    after = model(ids, labels=ids).aux_loss
    assert abs(after.item() - before.item()) <= 1e-6 * abs(before.item())


def test_a_family_whose_loss_differs_keeps_its_own():
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe())
    module = sys.modules[type(model).__module__]
    installed = module.load_balancing_loss_func
    try:
        module.load_balancing_loss_func = lambda logits, num_experts, top_k, mask: torch.tensor(1.0)
        assert "transformers'" in use_sync_free_aux_loss(model)
        assert module.load_balancing_loss_func is not sync_free_load_balancing_loss
    finally:
        module.load_balancing_loss_func = installed
