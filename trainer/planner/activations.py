"""Activation bytes per token that autograd keeps for the backward, per block type.

Counted tensor by tensor from what transformers 5.17's modules (and the `moe_fast` experts, which save the same
tensors as HF's `grouped_mm`) pass to `save_for_backward`; `c` is the compute dtype size (2 for bf16):

- RMSNorm (HF): the fp32 copy of the input (4H) and the normalised input before the weight multiply (cH).
- GQA attention (sdpa, no mask: flash with native GQA, k/v are not repeated): q and k, v as sdpa reads them (c each),
  the output (c; o_proj reads the same storage), the log-sum-exp (4 per head). With Qwen3's q/k norm, q and k also
  keep the norm's fp32 copy and normalised copy (4 + c more each).
- MLA (DeepSeek-V3): the two low-rank norms, q and k after the rope concat, v as a view of kv_b's output (so the
  whole [T, heads x (nope + v)] stays alive), the output.
- Mamba2 with the mamba_ssm fused kernel: the in_proj output zxbcdt and the scan output before the gated norm
  (the conv and the chunk states are recomputed in the backward), the norm's rstd.
- Dense MLP: gated keeps gate-out, act-out, up-out, product (4cI); relu2 keeps relu-out and square-out (2cI).
- MoE: router (bf16 router: fp32 softmax 4E + logits kept for the aux loss cE; fp32 router: fp32 input copy 4H +
  sigmoid and masked scores 8E + mask E), then per routed row (r = K x capacity rows land on a rank): the grouped
  GEMM input cH, the up output (gated: 2cI kept by the activation, plus act-out cI and product cI; relu2: 2cI),
  and on the token side the K expert outputs the weighted sum reads (cKH); 32 bytes of permutation indices per row.
  The fused expert MLP (`trainer.kernels.fused_expert_mlp`, `fused_experts`) keeps per row only the pre-activation
  (2cI gated, cI relu2) and the indices; its backward gathers the input rows again from the tokens (cH per token).

`workspace` is the transient memory while one block runs its backward (gradients of its largest tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.planner.model_shape import MLA, Attention, Block, DenseMLP, Mamba2, MoE

INDEX_BYTES_PER_ROW = 32  # perm, inverse perm, gather index (int64) and a mask byte per routed row


@dataclass(frozen=True)
class ActivationContext:
    """What the per-token byte counts depend on besides the block itself."""

    hidden: int
    compute_bytes: int = 2
    capacity_factor: float = 1.0  # rows a rank receives over the mean (1.0 without EP: every row is local)
    ep_size: int = 1
    fused_experts: bool = False  # the fused expert MLP's saved tensors instead of grouped_mm's


@dataclass(frozen=True)
class BlockBytes:
    """Per-token bytes of one block (its pre-norm included)."""

    saved: float  # kept from forward to backward without checkpointing
    experts: float  # the part of `saved` that `moe` checkpointing recomputes (routed + shared experts)
    workspace: float  # transient during this block's backward
    kind: str


def norm_bytes(hidden: int, c: int) -> float:
    return (4 + c) * hidden


def block_bytes(block: Block, ctx: ActivationContext) -> BlockBytes:
    """Per-token activation bytes of `block` (pre-norm included)."""
    h, c = ctx.hidden, ctx.compute_bytes
    norm = norm_bytes(h, c)
    if isinstance(block, Attention):
        q_dim, kv_dim = block.num_heads * block.head_dim, block.num_kv_heads * block.head_dim
        per_qk = (4 + 2 * c) if block.qk_norm else c
        saved = per_qk * (q_dim + kv_dim) + c * kv_dim + c * q_dim + 4 * block.num_heads
        workspace = c * (2 * q_dim + 2 * kv_dim) + c * h
        return BlockBytes(norm + saved, 0.0, workspace, "attention")
    if isinstance(block, MLA):
        nh = block.num_heads
        lora = norm_bytes(block.q_lora_rank, c) if block.q_lora_rank else 0
        saved = lora + norm_bytes(block.kv_lora_rank, c) + c * nh * (2 * block.qk_head_dim)
        saved += c * nh * (block.qk_nope_head_dim + block.v_head_dim) + c * nh * block.v_head_dim + 4 * nh
        workspace = c * nh * (2 * block.qk_head_dim + 2 * block.v_head_dim) + c * h
        return BlockBytes(norm + saved, 0.0, workspace, "mla")
    if isinstance(block, Mamba2):
        saved = c * block.in_proj_dim + c * block.inner + 4 * block.n_groups
        workspace = c * (block.in_proj_dim + block.conv_dim + block.inner) + c * h
        return BlockBytes(norm + saved, 0.0, workspace, "mamba2")
    if isinstance(block, DenseMLP):
        saved = (4 if block.gated else 2) * c * block.intermediate
        workspace = c * (2 * block.intermediate + h)
        return BlockBytes(norm + saved, 0.0, workspace, "dense")
    if isinstance(block, MoE):
        return _moe_bytes(block, ctx, norm)
    raise TypeError(f"unknown block {block!r}")


def routed_rows_per_token(block: MoE, ctx: ActivationContext) -> float:
    """Rows (token, expert pairs) the busiest rank's experts process per token of its micro-batch."""
    return block.top_k * (ctx.capacity_factor if ctx.ep_size > 1 else 1.0)


def _moe_bytes(block: MoE, ctx: ActivationContext, norm: float) -> BlockBytes:
    h, c, e, k, i = ctx.hidden, ctx.compute_bytes, block.num_experts, block.top_k, block.intermediate
    if block.router_fp32:
        router = 4 * h + 8 * e + e + 12 * k
    else:
        router = 4 * e + c * e + 12 * k
    rows = routed_rows_per_token(block, ctx)
    if ctx.fused_experts:
        per_row = (2 * c * i if block.gated else c * i) + INDEX_BYTES_PER_ROW
        routed = rows * per_row + c * k * h + c * h * ctx.ep_size  # the tokens (the EP group's when gathered)
    else:
        per_row = c * h + (4 * c * i if block.gated else 2 * c * i) + INDEX_BYTES_PER_ROW
        routed = rows * per_row + c * k * h
    shared = 0.0
    if block.shared_intermediate:
        shared = (4 if block.gated else 2) * c * block.shared_intermediate
    up_width = 2 * i if block.gated else i
    workspace = rows * c * (2 * h + 2 * up_width)
    if ctx.ep_size > 1:
        workspace += c * k * h  # the all-to-all send buffer (rows permuted before leaving the rank)
    return BlockBytes(norm + router + routed + shared, routed + shared, workspace, "moe")
