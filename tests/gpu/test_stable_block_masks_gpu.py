"""On a GPU: CUDA-graph layers of a flex-attention model record their graphs once, however each packed batch splits
into documents (`trainer.models.stable_block_masks`: the block masks that transformers builds per batch are kept at
the same addresses, which the graphs take as static inputs). Without it, each new mask address recorded the layer
again (B1-bs4 on an H200: 95 recordings in 15 steps).

Run: `pytest -m gpu tests/gpu/test_stable_block_masks_gpu.py`. Counts cudagraph trees' recordings after two warm-up
steps: none may follow.
"""

from __future__ import annotations

import pytest
import torch

import tiny_configs
from perf_options import perf_options
from trainer.models import MoEAutoModelForCausalLM
from trainer.perf import apply_optimizations

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

T = 512


def _packed_positions(split: int) -> torch.Tensor:
    return torch.cat([torch.arange(split), torch.arange(T - split)]).expand(2, -1).cuda()


def test_graph_layers_record_once_across_packings(monkeypatch):
    from torch._inductor import cudagraph_trees

    recordings = []
    record = cudagraph_trees.CUDAGraphTreeManager.record_function

    def counting(self, *args, **kwargs):
        recordings.append(1)
        return record(self, *args, **kwargs)

    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function", counting)
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = tiny_configs.qwen3_moe(hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                                    vocab_size=4096, max_position_embeddings=T, num_hidden_layers=2,
                                    head_dim=64)  # flex attention's Triton kernel needs head_dim >= 16
    with torch.device("cuda"):
        model = MoEAutoModelForCausalLM.from_config(config, attn_implementation="flex_attention").to(torch.bfloat16)
    options = perf_options("fused_ce=on", "fused_experts=on", "compile=layers-graphs", device="cuda")
    notes = apply_optimizations(model, options)
    assert any("flex-attention masks kept" in note for note in notes), notes
    ids = torch.randint(0, config.vocab_size, (2, T), device="cuda")
    after_warmup = None
    for step, split in enumerate([100, 200, 37, 300, 450, 129]):
        torch.compiler.cudagraph_mark_step_begin()
        out = model(input_ids=ids, position_ids=_packed_positions(split), use_cache=False)
        out.logits.float().mean().backward()
        for p in model.parameters():
            p.grad = None
        if step == 1:
            after_warmup = len(recordings)
    torch.cuda.synchronize()
    assert after_warmup > 0  # the layers did record graphs
    assert len(recordings) == after_warmup, f"{len(recordings) - after_warmup} recordings after the warm-up"
