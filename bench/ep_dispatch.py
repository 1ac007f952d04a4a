"""Expert-parallel dispatch + combine at the Qwen3-30B-A3B layer shape: all-to-all vs DeepEP.

    torchrun --nproc-per-node 2 bench/ep_dispatch.py --out ep_dispatch.json

Random routing (top-8 of 128 experts, distinct per token), 16384 tokens per GPU, hidden 2048, bf16. Each dispatcher
runs dispatch -> a per-expert scaling (stand-in for the expert MLP, so rows must reach the right expert) -> combine,
then backward. Checks: DeepEP's expert rows, offsets and combined output equal the all-to-all dispatcher's bit for
bit; input and routing-weight gradients agree within bf16 tolerance (and whether they are bit-identical is
reported). Times (CUDA events, median of --iters after --warmup): dispatch, combine, forward+backward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cuda_timing import median_ms  # noqa: E402
from trainer.parallel.alltoall import AllToAllDispatcher  # noqa: E402


def routing(tokens: int, experts: int, top_k: int, seed: int, device):
    g = torch.Generator(device=device).manual_seed(seed)
    index_TK = torch.rand(tokens, experts, generator=g, device=device).topk(top_k, dim=1).indices
    weights_TK = torch.softmax(torch.randn(tokens, top_k, generator=g, device=device), dim=1)
    return index_TK, weights_TK


def run_once(dispatcher, x_TD, index_TK, weights_TK, num_experts, scale_E, grad_TD):
    """One forward + backward; returns rows, offsets, output and the two input gradients."""
    x = x_TD.detach().requires_grad_(True)
    w = weights_TK.detach().requires_grad_(True)
    rows_SD, plan = dispatcher.dispatch(x, index_TK, num_experts, w)
    experts_per_rank = scale_E.shape[0]
    y_SD = rows_SD * scale_E[plan.expert_of_row_S.long() % experts_per_rank].unsqueeze(1)
    out_TD = dispatcher.combine(y_SD, w, plan)
    out_TD.backward(grad_TD)
    return rows_SD.detach(), plan.offsets_E.detach(), out_TD.detach(), x.grad, w.grad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096 * 4)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default="ep_dispatch.json")
    args = parser.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", local_rank)
    group = dist.new_group(list(range(world)))

    from trainer.parallel.dispatchers import deepep_unavailable_reason

    reason = deepep_unavailable_reason(group, "cuda")
    dispatchers = {"alltoall": AllToAllDispatcher(group)}
    if reason is None:
        from trainer.parallel.deepep import DeepEPDispatcher

        dispatchers["deepep"] = DeepEPDispatcher(group, args.hidden)
    elif rank == 0:
        print(f"DeepEP skipped: {reason}")

    torch.manual_seed(1234 + rank)
    x_TD = torch.randn(args.tokens, args.hidden, device=device, dtype=torch.bfloat16)
    index_TK, weights_TK = routing(args.tokens, args.experts, args.top_k, 99 + rank, device)
    scale_E = torch.linspace(0.5, 1.5, args.experts // world, device=device, dtype=torch.bfloat16)
    grad_TD = torch.randn_like(x_TD)

    results = {name: run_once(d, x_TD, index_TK, weights_TK, args.experts, scale_E, grad_TD) for name, d in dispatchers.items()}
    report: dict = {"shape": vars(args) | {"world": world}, "checks": {}, "timings_ms": {}}
    if "deepep" in results:
        a, d = results["alltoall"], results["deepep"]
        names = ["rows", "offsets", "output", "grad_x", "grad_weights"]
        for name, ta, td in zip(names, a, d):
            exact = torch.equal(ta, td)
            rel = ((ta.float() - td.float()).norm() / ta.float().norm().clamp_min(1e-30)).item()
            report["checks"][name] = {"bit_identical": exact, "relative_difference": rel}
        forward_exact = all(report["checks"][n]["bit_identical"] for n in names[:3])
        backward_close = all(report["checks"][n]["relative_difference"] <= 1e-2 for n in names[3:])
        report["checks"]["forward_bit_identical"] = forward_exact
        report["checks"]["backward_within_bf16_tolerance"] = backward_close

    for name, dispatcher in dispatchers.items():
        x = x_TD.detach().requires_grad_(True)
        w = weights_TK.detach().requires_grad_(True)
        state = {}

        def dispatch():
            state["rows"], state["plan"] = dispatcher.dispatch(x, index_TK, args.experts, w)

        def combine():
            dispatcher.combine(state["rows"], w, state["plan"])

        def forward_backward():
            run_once(dispatcher, x_TD, index_TK, weights_TK, args.experts, scale_E, grad_TD)

        dispatch()
        report["timings_ms"][name] = {
            "dispatch": median_ms(dispatch, args.iters, args.warmup, before=dist.barrier),
            "combine": median_ms(combine, args.iters, args.warmup, before=dist.barrier),
            "forward_backward": median_ms(forward_backward, args.iters, args.warmup, before=dist.barrier),
        }
        rows = state["rows"].shape[0]
        report["timings_ms"][name]["rows_received"] = rows

    if rank == 0:
        print(f"{'dispatcher':<10} {'dispatch ms':>12} {'combine ms':>11} {'fwd+bwd ms':>11}")
        for name, t in report["timings_ms"].items():
            print(f"{name:<10} {t['dispatch']:>12.3f} {t['combine']:>11.3f} {t['forward_backward']:>11.3f}")
        for name, check in report["checks"].items():
            print(f"check {name}: {check}")
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    from trainer.parallel import teardown

    teardown()
    dist.barrier()
    dist.destroy_process_group()
    ok = report["checks"].get("forward_bit_identical", True) and report["checks"].get("backward_within_bf16_tolerance", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
