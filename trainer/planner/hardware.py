"""GPU node presets for the planner: memory, peak bf16 FLOP/s, and the bandwidths the cost model uses.

`memory_gib` is what `torch.cuda.get_device_properties(0).total_memory` reports, in GiB. Bandwidths are
effective numbers, not link maxima: NVLink all-gather/reduce-scatter bus bandwidth as NCCL reaches it on an
8-GPU HGX board, all-to-all as NCCL and as DeepEP's normal kernels reach it intranode (DeepEP publishes
153 GB/s dispatch / 158 GB/s combine for EP8 on H800).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import UserError

GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    peak_bf16_tflops: float = 989.0  # dense bf16, the figure MFU is quoted against (H100/H200 SXM)
    hbm_gbps: float = 3350.0
    nvlink_busbw_gbps: float = 360.0  # NCCL all-gather / reduce-scatter, 8 GPUs, NVLink 4
    alltoall_gbps: float = 110.0  # NCCL all_to_all_single per rank, intranode
    deepep_gbps: float = 150.0  # DeepEP normal kernels, intranode
    gpus_per_node: int = 8
    nvlink: bool = True
    reserve_gib: float = 2.0  # CUDA context, NCCL and cuBLAS workspaces: outside max_memory_allocated
    fragmentation: float = 0.05  # caching-allocator fragmentation, as a fraction of the peak


GPU_PRESETS = {
    "H100-80GB": GPU("H100-80GB", memory_gib=79.1, hbm_gbps=3350.0),
    "H200-141GB": GPU("H200-141GB", memory_gib=139.8, hbm_gbps=4800.0),
}
ALIASES = {"h100": "H100-80GB", "h100-80gb": "H100-80GB", "h200": "H200-141GB", "h200-141gb": "H200-141GB"}


def gpu_preset(name: str) -> GPU:
    key = ALIASES.get(name.lower(), name)
    if key not in GPU_PRESETS:
        raise UserError(f"unknown GPU preset '{name}'", f"use one of {', '.join(GPU_PRESETS)} or --gpu-mem GiB")
    return GPU_PRESETS[key]


def gpu_with_memory(memory_gib: float, like: str = "H100-80GB") -> GPU:
    """A preset's bandwidths with a different memory size (for `--gpu-mem`)."""
    from dataclasses import replace

    return replace(gpu_preset(like), name=f"{memory_gib:g}GiB", memory_gib=float(memory_gib))
