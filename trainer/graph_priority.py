"""Compiled layers' CUDA graphs captured on a high-priority stream (`PerfOptions.graph_priority`).

PyTorch instantiates CUDA graphs with `cudaGraphInstantiateFlagUseNodePriority`: each kernel of a graph keeps the
priority of the stream it was captured on, whatever stream later replays it. torch.compile's CUDA graphs
(`mode="reduce-overhead"`, cudagraph trees) are captured on a stream of their own at the default priority, the same
priority as the overlapped optimizer's side stream. Beside the backward, a large AdamW grid then has all its blocks
handed out before the backward's next kernel starts (B1-bs1's profile, docs/BENCHMARKS.md). Captured at the highest
priority, the layers' kernels go first and the AdamW blocks fill what they leave.

The switch goes through cudagraph trees' manager (a private API): it must run before the first compiled call, since
each recorded graph takes the manager's stream when it is created. Where that API is missing it changes nothing and
says so.
"""

from __future__ import annotations

import torch


def capture_graphs_at_high_priority(device: torch.device) -> str:
    """Give the device's cudagraph-tree manager a capture stream of the highest priority; returns a note."""
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_container(device.index if device.index is not None else 0).get_tree_manager()
        current, recorded = manager.stream, manager.current_node is not None or any(manager.roots.values())
    except Exception as err:  # a torch whose cudagraph trees are laid out differently
        return f"CUDA graphs at high priority: not available in this torch ({type(err).__name__}): default priority"
    if current.priority < 0:
        return "CUDA graphs captured on a high-priority stream"
    if recorded:
        return "CUDA graphs at high priority: graphs already recorded on this device: default priority"
    high = torch.cuda.Stream(device=current.device, priority=-100)  # out of range: torch maps it to the highest
    high.wait_stream(current)
    manager.stream = high
    return "CUDA graphs captured on a high-priority stream"
