"""A simple step-time model to rank layouts (docs/PLANNER.md, "Cost model").

time per micro-batch = compute + all-to-all + exposed FSDP2 traffic + optimizer share, where
- compute = executed FLOPs / (peak x efficiency(m)); efficiency grows with m, the rows each local expert's grouped
  GEMM gets per micro-batch: e_max * m / (m + m_half). EP raises m (a rank holds fewer experts and receives the
  same number of rows), which is why it speeds up small micro-batches;
- all-to-all = bytes leaving a rank / link bandwidth, not overlapped (4 passes: dispatch, combine, and their
  gradients; 2 more when checkpointing recomputes the experts);
- FSDP2 all-gathers (forward + backward) and reduce-scatters overlap with 80% of the compute time; only the
  excess is exposed;
- the optimizer step streams params, grads and states through HBM once per optimizer step.
Model FLOPs follow the benchmark protocol: 6 x active parameters per token (top-k experts only, lm_head counted,
embedding not) + causal attention at half the square.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.planner.hardware import GPU
from trainer.planner.layout import Layout, PlanOptions
from trainer.planner.memory import rank_params, uses_fsdp
from trainer.planner.model_shape import MLA, Attention, DenseMLP, Mamba2, ModelShape, MoE
from trainer.planner.precision import precision

MAMBA_CHUNK = 128


@dataclass(frozen=True)
class Efficiency:
    """Fraction of peak FLOP/s reached, as a function of rows per local expert per micro-batch."""

    e_max: float
    m_half: float

    def at(self, rows_per_expert: float) -> float:
        return self.e_max * rows_per_expert / (rows_per_expert + self.m_half)


# hf_native: fitted to transformers 5.17 grouped_mm on one H200 (Qwen3-30B-A3B x 12 layers, seq 4096: 16.1k, 22.6k,
# 27.6k tok/s at micro-batch 1, 2, 4; less the optimizer time, compute runs at 13.5%, 18.0%, 21.2% of peak).
# moe_fast: fitted to this trainer on the same H200 and job (bf16, fused CE + fused experts + Liger + AdamW in
# backward: 19.4k and 43.9k tok/s at micro-batch 1 and 4, docs/BENCHMARKS.md), which it reproduces within 0.3%.
EFFICIENCY = {"hf_native": Efficiency(0.262, 243.0), "moe_fast": Efficiency(0.55, 620.0)}
# Share of the compute time that hides FSDP2 all-gathers / reduce-scatters. Fitted to B2 on two H200s: FSDP2 added
# its full transfer time at 360 GB/s to the one-GPU step (+67 ms measured vs 62 ms; +42 vs 42 ms with
# reshard_after_forward=False), although it runs beside the compute: NCCL's kernels share SMs and HBM bandwidth.
FSDP_OVERLAP = 0.0


@dataclass(frozen=True)
class StepEstimate:
    seconds: float  # per micro-batch on one rank
    compute_s: float
    alltoall_s: float
    fsdp_exposed_s: float
    optimizer_s: float
    tokens_per_s: float  # per GPU
    model_tflops_per_s: float  # per GPU, model FLOPs (no recompute)
    mfu: float


def forward_flops_per_token(shape: ModelShape, seq_len: int) -> tuple[float, float]:
    """(expert, other) forward model FLOPs per token: 2 x active params + causal attention (half the square)."""
    h = shape.hidden
    expert = 0.0
    other = 2.0 * shape.vocab_size * h  # lm_head
    for layer in shape.layers:
        for block in layer:
            if isinstance(block, MoE):
                expert += 2.0 * block.top_k * block.expert_params(h) / block.num_experts
                other += 2.0 * block.non_expert_params(h)
            elif isinstance(block, Attention):
                other += 2.0 * block.params(h) + 2.0 * seq_len * block.num_heads * block.head_dim
            elif isinstance(block, MLA):
                other += 2.0 * block.params(h)
                other += seq_len * block.num_heads * (block.qk_head_dim + block.v_head_dim)
            elif isinstance(block, Mamba2):
                other += 2.0 * block.params(h)
                other += MAMBA_CHUNK * block.num_heads * (block.state_size + block.head_dim)
                other += 4.0 * block.inner * block.state_size
            elif isinstance(block, DenseMLP):
                other += 2.0 * block.params(h)
    return expert, other


def model_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Training model FLOPs per token (forward + backward = 3 x forward), as the benchmark protocol counts them."""
    expert, other = forward_flops_per_token(shape, seq_len)
    return 3.0 * (expert + other)


def rows_per_local_expert(shape: ModelShape, layout: Layout) -> float:
    moe = shape.moe_blocks
    if not moe:
        return float(layout.tokens)
    block = moe[0]
    return layout.tokens * block.top_k * layout.ep_size / block.num_experts


def alltoall_bytes(shape: ModelShape, layout: Layout, compute_bytes: int) -> float:
    """Bytes one rank sends per micro-batch across all MoE layers and passes."""
    if layout.ep_size == 1:
        return 0.0
    ep = layout.ep_size
    passes = 4 + (2 if layout.checkpointing in ("full", "moe") else 0)
    total = 0.0
    for block in shape.moe_blocks:
        if layout.dispatcher == "deepep":  # one copy per distinct destination rank
            rows = ep * (1 - (1 - 1 / ep) ** block.top_k) * (ep - 1) / ep
        elif layout.dispatcher == "allgather":  # every token to every other rank (all-gather / reduce-scatter)
            rows = ep - 1
        else:  # one row per (token, expert) pair
            rows = block.top_k * (ep - 1) / ep
        total += passes * layout.tokens * rows * shape.hidden * compute_bytes
    return total


def estimate_step(shape: ModelShape, layout: Layout, gpu: GPU, options: PlanOptions | None = None,
                  implementation: str = "moe_fast") -> StepEstimate:
    """Estimated time of one micro-batch (forward + backward + its share of the optimizer step) on one rank."""
    options = options or PlanOptions()
    prec = precision(options.precision)
    expert_fwd, other_fwd = forward_flops_per_token(shape, layout.seq_len)
    model_flops = 3.0 * (expert_fwd + other_fwd) * layout.tokens
    # "attention" recomputes part of the non-expert forward: counted as all of it (an upper bound)
    recompute = {"none": 0.0, "moe": expert_fwd, "attention": other_fwd,
                 "full": expert_fwd + other_fwd}[layout.checkpointing]
    executed = model_flops + recompute * layout.tokens
    eff = EFFICIENCY[implementation].at(rows_per_local_expert(shape, layout))
    peak = gpu.peak_bf16_tflops * 1e12
    compute_s = executed / (peak * eff)

    # the all-gather dispatcher's collectives run at NCCL's all-gather / reduce-scatter bus bandwidth
    bw = {"deepep": gpu.deepep_gbps, "allgather": gpu.nvlink_busbw_gbps}.get(layout.dispatcher, gpu.alltoall_gbps)
    alltoall_s = alltoall_bytes(shape, layout, prec.compute_bytes) / (bw * 1e9)

    fsdp_s = 0.0
    if uses_fsdp(layout, options) and layout.dp_shard > 1:
        frac = (layout.dp_shard - 1) / layout.dp_shard
        gathered = sum(ex / layout.ep_size + ne for ex, ne in map(shape.layer_params, shape.layers))
        gathers = 2 if layout.reshard_after_forward else 1  # zero2: no second all-gather for the backward
        fsdp_bytes = gathered * frac * (gathers * prec.compute_bytes + prec.reduce_bytes)
        fsdp_bytes += shape.root_params * frac * (prec.compute_bytes + prec.reduce_bytes)
        fsdp_s = fsdp_bytes / (gpu.nvlink_busbw_gbps * 1e9)
    fsdp_exposed = max(0.0, fsdp_s - FSDP_OVERLAP * compute_s)

    layer_params, root_params = rank_params(shape, layout)
    n_rank = sum(layer_params) + root_params
    opt_bytes = 2 * n_rank * (prec.param_bytes + prec.grad_bytes + prec.state_bytes)
    if layout.dp_replicate > 1:  # HSDP: gradients all-reduced across replicas once per optimizer step
        opt_bytes_net = n_rank * prec.reduce_bytes * 2 * (layout.dp_replicate - 1) / layout.dp_replicate
    else:
        opt_bytes_net = 0.0
    optimizer_s = (opt_bytes / (gpu.hbm_gbps * 1e9) + opt_bytes_net / (gpu.nvlink_busbw_gbps * 1e9))
    optimizer_s /= max(1, options.grad_accum_steps)

    seconds = compute_s + alltoall_s + fsdp_exposed + optimizer_s
    tokens_per_s = layout.tokens / seconds
    model_tflops = model_flops / seconds / 1e12
    return StepEstimate(seconds, compute_s, alltoall_s, fsdp_exposed, optimizer_s, tokens_per_s, model_tflops,
                        model_tflops * 1e12 / peak)
