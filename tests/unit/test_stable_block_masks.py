"""Flex-attention masks kept at stable addresses (trainer.models.stable_block_masks): same values as transformers
builds, the same tensors every forward, one set per mask of a forward; other models untouched. CPU, forward only
(flex attention has no CPU backward); the effect on CUDA graphs is measured on the device (docs/BENCHMARKS.md)."""

import pytest
import torch

from tests import tiny_configs
from trainer.models.auto import MoEAutoModelForCausalLM
from trainer.models.stable_block_masks import keep_block_masks_in_place

# torch 2.7's Inductor fails to compile flex attention for the CPU (C++ compile error in the plain model too)
pytestmark = pytest.mark.skipif(tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 8),
                                reason="flex attention on the CPU needs torch >= 2.8")

T = 512  # four blocks of 128: the packings below give different block masks


def _model(attn: str = "flex_attention"):
    torch.manual_seed(0)
    return MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe(num_hidden_layers=2), attn_implementation=attn)


def _packed_batch(split: int):
    torch.manual_seed(split)
    ids = torch.randint(0, tiny_configs.qwen3_moe().vocab_size, (2, T))
    positions = torch.cat([torch.arange(split), torch.arange(T - split)]).expand(2, -1)
    return {"input_ids": ids, "position_ids": positions, "use_cache": False}


def _masks_seen_by_first_layer(model, batches):
    seen = []

    def record(_module, _args, kwargs):
        mask = kwargs["attention_mask"]
        seen.append({name: (t.data_ptr(), t.clone()) for name, t in vars(mask).items() if isinstance(t, torch.Tensor)})

    handle = model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        logits = [model(**batch).logits for batch in batches]
    handle.remove()
    return seen, logits


def test_masks_keep_their_values_and_their_addresses_across_forwards():
    batches = [_packed_batch(100), _packed_batch(37), _packed_batch(300)]
    plain_masks, plain_logits = _masks_seen_by_first_layer(_model(), batches)
    kept = _model()
    assert keep_block_masks_in_place(kept)
    kept_masks, kept_logits = _masks_seen_by_first_layer(kept, batches)
    for plain, same_place in zip(plain_masks, kept_masks):
        assert plain.keys() == same_place.keys()
        for name, (_, value) in plain.items():
            assert torch.equal(value, same_place[name][1]), name
    for name in kept_masks[0]:
        assert len({m[name][0] for m in kept_masks}) == 1, f"{name} moved between forwards"
    assert any(not torch.equal(plain_masks[0][name][1], plain_masks[2][name][1]) for name in plain_masks[0])
    for a, b in zip(plain_logits, kept_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same code, same inputs, same CPU


def test_each_mask_of_a_forward_has_its_own_tensors():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    model = _model()
    assert keep_block_masks_in_place(model)
    make = ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"]

    def build():
        return make(batch_size=1, q_length=T, kv_length=T, config=model.config, device="cpu")

    forward = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "use_cache": False}
    with torch.no_grad():
        model(**forward)  # a forward starts: slots counted from 0 again
    first, second = build(), build()
    assert first.kv_indices.data_ptr() != second.kv_indices.data_ptr()
    with torch.no_grad():
        model(**forward)
    assert build().kv_indices.data_ptr() == first.kv_indices.data_ptr()


def test_other_models_and_attention_implementations_are_untouched():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert not keep_block_masks_in_place(_model("sdpa"))
    keep_block_masks_in_place(_model())  # wraps the mask function process-wide
    other = _model()
    make = ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"]
    a = make(batch_size=1, q_length=T, kv_length=T, config=other.config, device="cpu")
    b = make(batch_size=1, q_length=T, kv_length=T, config=other.config, device="cpu")
    assert a.kv_indices.data_ptr() != b.kv_indices.data_ptr()  # an unregistered model gets fresh masks
