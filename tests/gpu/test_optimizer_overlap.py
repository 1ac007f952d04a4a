"""On a GPU: AdamW stepped in backward on a side stream (`opt-overlap`) gives bit-identical parameters and losses to
the same updates on the compute stream (`opt-in-bwd`): only the stream differs, not the arithmetic.

Run: `pytest -m gpu tests/gpu/test_optimizer_overlap.py`. Tolerance: exact (torch.equal) over 4 steps, fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch

import tiny_configs
from trainer.models import MoEAutoModelForCausalLM
from trainer.perf import PerfOptions, causal_lm_loss
from trainer.step_optimizer import build_optimizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _train(spec: str, dtype: torch.dtype, steps: int = 4):
    torch.manual_seed(0)
    config = tiny_configs.qwen3_moe(output_router_logits=True, router_aux_loss_coef=0.01, hidden_size=256,
                                    intermediate_size=512, moe_intermediate_size=256, vocab_size=4096,
                                    max_position_embeddings=512)
    with torch.device("cuda"):
        model = MoEAutoModelForCausalLM.from_config(config).to(dtype)
    ids = torch.randint(0, config.vocab_size, (4, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    options = PerfOptions.parse(spec)
    optimizer = build_optimizer(model, options, lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = causal_lm_loss(model, ids, ids, options).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.cuda.synchronize()
    return model, losses, optimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_side_stream_updates_equal_in_stream_updates(dtype):
    reference, reference_losses, _ = _train("opt-in-bwd", dtype)
    overlapped, losses, optimizer = _train("opt-overlap", dtype)
    assert optimizer._side_stream is not None
    assert losses == reference_losses
    for (name, a), (_, b) in zip(reference.named_parameters(), overlapped.named_parameters()):
        assert torch.equal(a, b), name
        assert b.grad is None, name
