"""On a GPU: the router aux loss runs without a host synchronisation (transformers' bincount needs two per layer).

Run: `pytest -m gpu tests/gpu/test_aux_loss_gpu.py`. Checked with CUDA's sync debug mode set to raise on any
synchronising call; the value equals transformers' within 1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch

from trainer.models.aux_loss import sync_free_load_balancing_loss

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_no_host_synchronisation_and_same_value_as_transformers():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM  # noqa: F401 - loads the module
    import sys

    module = sys.modules["transformers.models.qwen3_moe.modeling_qwen3_moe"]
    reference = module.load_balancing_loss_func
    logits = tuple(torch.randn(4096, 128, device="cuda") for _ in range(12))
    want = None if reference is sync_free_load_balancing_loss else reference(logits, 128, 8, None)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sync_free_load_balancing_loss(logits, 128, 8, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if want is not None:
        assert abs(got.item() - want.item()) <= 1e-6 * abs(want.item())
