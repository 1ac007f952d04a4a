"""trainer.models.output_capture: transformers' output capture through a global slot gives the same outputs."""

from __future__ import annotations

import torch

import tiny_configs
from trainer.models import MoEAutoModelForCausalLM
from trainer.models.output_capture import _GlobalCollector, compile_friendly_output_capture


def _router_logits(model, ids):
    return model(input_ids=ids, output_router_logits=True, use_cache=False).router_logits


def test_router_logits_and_aux_loss_are_unchanged_by_the_global_collector():
    from transformers.utils import output_capturing

    torch.manual_seed(0)
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe(num_hidden_layers=3))
    ids = torch.randint(0, tiny_configs.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    original = output_capturing._active_collector
    try:
        before = _router_logits(model, ids)
        assert compile_friendly_output_capture()
        assert compile_friendly_output_capture()  # idempotent
        after = _router_logits(model, ids)
        assert output_capturing._active_collector.get() is None  # reset after the forward
    finally:
        output_capturing._active_collector = original
    assert len(before) == len(after) == 3
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def test_nested_captures_unwind_like_a_context_variable():
    collector = _GlobalCollector()
    outer = collector.set({"router_logits": []})
    inner = collector.set({"attentions": []})
    assert "attentions" in collector.get()
    collector.reset(inner)
    assert "router_logits" in collector.get()
    collector.reset(outer)
    assert collector.get() is None
