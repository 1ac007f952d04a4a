"""The experts' weight gradient + AdamW of one Qwen3-30B-A3B MoE layer: separate kernels vs one fused kernel.

    python bench/expert_update.py [--tokens 4096,16384] [--iters 10] [--sweep] [--out expert_update.json]

Per token count (top-8 of 128 experts, random balanced-ish routing; hidden 2048, expert width 768, bf16 weights and
states): the backward's two weight-gradient GEMMs (gate_up [128, 1536, 2048], down [128, 2048, 768]) followed by
AdamW, three ways: the grouped GEMM + `torch._fused_adamw_`, the grouped GEMM + the Triton AdamW
(trainer.kernels.adamw), and the GEMM with the update in its epilogue (trainer.kernels.expert_update). Timed with
CUDA events (bench/cuda_timing.py), median of --iters after 3 warm-up rounds. --sweep also times the fused kernel
with other tile sizes and launch shapes (SWEEP) and names the fastest per token count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cuda_timing import median_ms  # noqa: E402
from trainer.kernels import adamw as adamw_kernel  # noqa: E402
from trainer.kernels.expert_update import (  # noqa: E402
    DEFAULT_CONFIG, ExpertUpdate, triton_available, weight_grad_adamw_)
from trainer.moe.grouped_gemm import grouped_mm_weight_grad  # noqa: E402

EXPERTS, HIDDEN, WIDTH, TOP_K = 128, 2048, 768, 8
SWEEP = [dict(BLOCK_P=p, BLOCK_Q=q, BLOCK_S=s, num_warps=w, num_stages=n) for p, q, s, w, n in (
    (128, 128, 32, 8, 4), (128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (64, 128, 64, 4, 4),
    (64, 256, 32, 4, 4), (128, 64, 64, 4, 4))]


def measure(tokens: int, iters: int, sweep: bool = False) -> dict:
    rows = tokens * TOP_K
    counts = torch.distributions.Multinomial(rows, torch.ones(EXPERTS)).sample().long()
    offsets = counts.cumsum(0).to(torch.int32).cuda()
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, grad_pre = torch.randn(rows, HIDDEN, **bf16), torch.randn(rows, 2 * WIDTH, **bf16)
    h, grad_y = torch.randn(rows, WIDTH, **bf16), torch.randn(rows, HIDDEN, **bf16)
    up = torch.randn(EXPERTS, 2 * WIDTH, HIDDEN, **bf16) * 0.02
    down = torch.randn(EXPERTS, HIDDEN, WIDTH, **bf16) * 0.02
    states = {w: (torch.zeros_like(w), torch.zeros_like(w)) for w in (up, down)}
    step = torch.ones((), device="cuda")
    update = ExpertUpdate({}, step, 1e-4, 0.9, 0.95, 1e-8, 0.0)
    pairs = ((up, grad_pre, x), (down, grad_y, h))  # HF layout [E, out, in]: grad_out^T @ in

    def separate(triton: bool):
        for weight, a, b in pairs:
            grad = grouped_mm_weight_grad(a, b, offsets, EXPERTS)
            if triton:
                adamw_kernel.adamw_(weight, grad, *states[weight], step, **update.hyper())
            else:
                torch._fused_adamw_([weight], [grad], *[[s] for s in states[weight]], [], [step], amsgrad=False,
                                    maximize=False, **update.hyper())

    def fused(config=None):
        for weight, a, b in pairs:
            weight_grad_adamw_(a, b, offsets, weight, *states[weight], update, config=config)

    def gemm_only():
        for _, a, b in pairs:
            grouped_mm_weight_grad(a, b, offsets, EXPERTS)

    row = {"tokens": tokens, "gemm_only_ms": median_ms(gemm_only, iters),
           "gemm_torch_adamw_ms": median_ms(lambda: separate(False), iters),
           "gemm_triton_adamw_ms": median_ms(lambda: separate(True), iters),
           "fused_ms": median_ms(fused, iters)}
    if sweep:
        row["sweep"] = [{**config, "ms": median_ms(lambda: fused(config), iters)}
                        for config in [DEFAULT_CONFIG] + SWEEP]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="4096,16384")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="time the fused kernel with other tile sizes too")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not (triton_available() and adamw_kernel.available()):
        print("needs a CUDA GPU and triton", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = [measure(int(t), args.iters, args.sweep) for t in args.tokens.split(",")]
    print(f"experts' weight gradient + AdamW, one MoE layer (0.60B expert parameters), {torch.cuda.get_device_name()}:")
    print(f"{'tokens':>7}{'GEMM only':>11}{'+ torch AdamW':>15}{'+ Triton AdamW':>16}{'fused':>8}")
    for row in rows:
        print(f"{row['tokens']:>7}{row['gemm_only_ms']:>9.2f}ms{row['gemm_torch_adamw_ms']:>13.2f}ms"
              f"{row['gemm_triton_adamw_ms']:>14.2f}ms{row['fused_ms']:>6.2f}ms")
        for entry in sorted(row.get("sweep", []), key=lambda e: e["ms"])[:3]:
            shape = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "ms")
            print(f"{'':>7}fused with {shape}: {entry['ms']:.2f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
