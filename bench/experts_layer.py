"""One MoE experts layer at the Qwen3-30B-A3B shape: our grouped-GEMM path vs transformers' `grouped_mm` experts.

Checks (bf16 on GPU): our fused grouped GEMM vs the reference per-expert loop (relative error of outputs and
gradients, both against an fp32 loop), then times forward+backward of both implementations with CUDA events.

    python bench/experts_layer.py --tokens 16384 --out experts_layer.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.integrations.moe import grouped_mm_experts_forward  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts  # noqa: E402

from trainer.moe import grouped_gemm  # noqa: E402
from trainer.moe.experts import fast_experts_forward  # noqa: E402


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The experts layer's shape (Qwen3-30B-A3B by default), timing iterations and the JSON output path."""
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)


def build(args, device, dtype):
    config = Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.intermediate, num_experts=args.experts,
                            num_experts_per_tok=args.top_k, hidden_act="silu")
    config._experts_implementation = "grouped_mm"
    experts = Qwen3MoeExperts(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(std=0.02)
        experts.down_proj.normal_(std=0.02)
    return experts


def routing(args, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, generator=gen)
    router = torch.randn(args.experts, args.hidden, generator=gen) * 0.05
    probs = torch.softmax(x @ router.T, dim=-1)
    weights, index = torch.topk(probs, args.top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return x.to(device), index.to(device), weights.to(device)


def run(fn, experts, x, index, weights, grad):
    x = x.detach().requires_grad_(True)
    experts.zero_grad(set_to_none=True)
    out = fn(experts, x, index, weights)
    out.backward(grad)
    return out.detach().float(), x.grad.float(), experts.gate_up_proj.grad.float(), experts.down_proj.grad.float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def time_it(fn, experts, x, index, weights, grad, iters):
    times = []
    for i in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        xx = x.detach().requires_grad_(True)
        start.record()
        out = fn(experts, xx, index, weights)
        out.backward(grad)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    add_shape_arguments(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    device, bf16 = torch.device("cuda"), torch.bfloat16
    x, index, weights = routing(args, device)
    grad = torch.randn(args.tokens, args.hidden, device=device, generator=torch.Generator(device).manual_seed(1))

    experts = build(args, device, bf16)
    experts32 = build(args, device, torch.float32)
    experts32.load_state_dict({k: v.float() for k, v in experts.state_dict().items()})
    exact = run(lambda m, *a: fast_experts_forward(m, *a), experts32, x.float(), index, weights, grad.float())

    fused = run(fast_experts_forward, experts, x.to(bf16), index, weights, grad.to(bf16))
    original_supported = grouped_gemm.grouped_mm_supported
    grouped_gemm.grouped_mm_supported = lambda *a: False  # the reference per-expert loop, same dtype
    try:
        looped = run(fast_experts_forward, experts, x.to(bf16), index, weights, grad.to(bf16))
    finally:
        grouped_gemm.grouped_mm_supported = original_supported
    names = ["output", "grad_input", "grad_gate_up", "grad_down"]
    errors = {
        name: {"fused_vs_loop": rel(f, l), "fused_vs_fp32": rel(f, e), "loop_vs_fp32": rel(l, e)}
        for name, f, l, e in zip(names, fused, looped, exact)
    }

    ours_ms = time_it(fast_experts_forward, experts, x.to(bf16), index, weights, grad.to(bf16), args.iters)
    hf_ms = time_it(grouped_mm_experts_forward, experts, x.to(bf16), index, weights, grad.to(bf16), args.iters)
    ours_ms2 = time_it(fast_experts_forward, experts, x.to(bf16), index, weights, grad.to(bf16), args.iters)
    hf_ms2 = time_it(grouped_mm_experts_forward, experts, x.to(bf16), index, weights, grad.to(bf16), args.iters)
    result = {
        "shape": vars(args), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "relative_errors_bf16": errors,
        "fwd_bwd_ms": {"moe_fast": [ours_ms, ours_ms2], "hf_grouped_mm": [hf_ms, hf_ms2]},
    }
    print(f"{'tensor':<14}{'fused vs loop':>15}{'fused vs fp32':>15}{'loop vs fp32':>14}")
    for name, e in errors.items():
        print(f"{name:<14}{e['fused_vs_loop']:>15.2e}{e['fused_vs_fp32']:>15.2e}{e['loop_vs_fp32']:>14.2e}")
    print(f"fwd+bwd ms (median of {args.iters}, two rounds): moe_fast {ours_ms:.3f} / {ours_ms2:.3f}   "
          f"hf grouped_mm {hf_ms:.3f} / {hf_ms2:.3f}   speedup {hf_ms / ours_ms:.2f}x / {hf_ms2 / ours_ms2:.2f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    worst = max(e["fused_vs_loop"] for e in errors.values())
    return 0 if worst <= 1e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
