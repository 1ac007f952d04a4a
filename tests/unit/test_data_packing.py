"""Packing is invisible to the model: a packed row gives every sample the loss it has when run alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer

from trainer.config import resolve_path
from trainer.data import IGNORE_INDEX, StatefulLoader, build_dataset
from trainer.loss import forward_loss_sum
from trainer.models import MoEAutoModelForCausalLM

SEQ_LEN = 160


@pytest.fixture(scope="module")
def dataset():
    tokenizer = AutoTokenizer.from_pretrained(resolve_path("builtin:tokenizer"))
    return build_dataset(resolve_path("builtin:data/sft.jsonl"), tokenizer, SEQ_LEN), tokenizer.pad_token_id


def _model(attn_implementation: str):
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(resolve_path("builtin:tiny-qwen3-moe"))
    return MoEAutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).eval()


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_batch_gives_the_same_per_sample_losses_as_one_by_one(dataset, attn_implementation):
    data, pad_id = dataset
    model = _model(attn_implementation)
    loader = StatefulLoader(data, SEQ_LEN, 2, pad_id, packing=True, shuffle=False)
    batch = next(loader)
    assert batch["num_samples"].item() >= 6  # several samples share each row
    with torch.no_grad():
        logits_BSV = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    token_loss_BS = F.cross_entropy(logits_BSV.transpose(1, 2), batch["targets"], reduction="none",
                                    ignore_index=IGNORE_INDEX)

    sample_index = 0
    for row in range(2):
        positions = batch["position_ids"][row].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0]
        for start in starts:
            if sample_index >= batch["num_samples"].item() or batch["targets"][row, start:].eq(IGNORE_INDEX).all():
                break  # the padding tail
            sample = data.samples[sample_index]
            alone = {
                "input_ids": torch.tensor([sample.input_ids]),
                "targets": torch.tensor([sample.targets()]),
                "position_ids": torch.arange(len(sample))[None],
            }
            with torch.no_grad():
                loss_alone, _ = forward_loss_sum(model, alone)
            loss_packed = token_loss_BS[row, start:start + len(sample)].sum()
            # Same tokens and the same attention pattern; only the matmul shapes differ (fp32 rounding).
            torch.testing.assert_close(loss_packed, loss_alone, rtol=1e-5, atol=1e-4)
            sample_index += 1
    assert sample_index == batch["num_samples"].item()


def test_padding_tail_gets_no_loss(dataset):
    data, pad_id = dataset
    batch = next(StatefulLoader(data, SEQ_LEN, 1, pad_id, packing=True, shuffle=False))
    pad_positions = batch["input_ids"][0] == pad_id
    assert pad_positions.any()
    assert batch["targets"][0][pad_positions].eq(IGNORE_INDEX).all()
