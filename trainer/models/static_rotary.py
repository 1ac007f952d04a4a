"""The rotary embedding's (cos, sin) written into buffers that keep their address from step to step.

A decoder layer replayed as a CUDA graph reads its inputs from fixed addresses. Inputs that are neither parameters
nor another graph's outputs are copied into the graph's own placeholders before every replay: for the rotary
(cos, sin), which the model computes once per forward outside the layers, that is one copy kernel before each
layer's forward and each layer's backward. Those copies are launched on the compute stream at its priority, not as
part of a graph, so with the overlapped optimizer each can wait for the AdamW kernel running on the side stream to
hand back the SMs (about 1 ms each in a profiled B1-bs4 step: docs/BENCHMARKS.md).

Here the embedding's forward writes its result into two buffers per shape, marked as static addresses
(`torch._dynamo.mark_static_address`), so the graphs read them in place and nothing is copied per layer. The
buffers are overwritten by the next forward, after the previous backward has read them (a step's forward and
backward run in order on one stream; recomputation under activation checkpointing sees the same values).
"""

from __future__ import annotations

import torch
from torch import nn


def is_rotary_embedding(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RotaryEmbedding")


def use_static_rotary(model: nn.Module) -> int:
    """Route every rotary embedding of `model` through fixed-address buffers; returns how many were patched."""
    count = 0
    for module in model.modules():
        if is_rotary_embedding(module) and "_static_rotary_buffers" not in module.__dict__:
            module._static_rotary_buffers = {}
            module.forward = _static_forward(module.forward, module._static_rotary_buffers)
            count += 1
    return count


def _static_forward(forward, buffers: dict):
    @torch.no_grad()
    def static_forward(*args, **kwargs):
        outputs = forward(*args, **kwargs)
        key = tuple((t.shape, t.dtype, t.device) for t in outputs)
        held = buffers.get(key)
        if held is None:
            held = tuple(torch.empty_like(t) for t in outputs)
            for t in held:
                torch._dynamo.mark_static_address(t)
            buffers[key] = held
        for buffer, value in zip(held, outputs):
            buffer.copy_(value)
        return held

    return static_forward
