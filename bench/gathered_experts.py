"""The all-gather dispatcher's expert side on one GPU, collectives left out: what its static shapes cost.

At EP=W each rank runs its E/W experts on all W*T tokens of the group, with the pairs of experts elsewhere sorted
past the last offset (computed by no GEMM, but their rows are allocated, gathered and masked). This times, compiled
as inside a decoder layer (forward + backward, bf16, Qwen3-30B-A3B expert shape):

    local      T tokens, all E experts here (one GPU, no expert parallelism)
    gathered   W*T tokens, experts [0, E/W) here: about the same T*K rows computed, buffers for W*T*K rows

each with the K-way row sums and dots (combine, its weight gradient, dispatch backward) as Inductor's fused gathers
(`torch`), as the Triton kernels of `trainer.kernels.row_sum` (`row-sum`), and with the row-bounded kernels of
`trainer.kernels.bounded_rows` on top (`row-sum+bounded`: they change only the gathered layouts).

    python bench/gathered_experts.py --tokens 16384 --ranks 2 4 --out gathered_experts.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.experts_layer import add_shape_arguments, build, routing  # noqa: E402
from trainer.kernels import bounded_rows, row_sum  # noqa: E402
from trainer.moe.experts import fast_experts_forward, set_fused_experts  # noqa: E402
from trainer.parallel.allgather import GatheredTokens  # noqa: E402
from trainer.parallel.apply import rank_experts, stacked_expert_params  # noqa: E402


class FirstRankOfW:
    """Rank 0 of a W-rank group without the collectives: the tokens given are already the group's."""

    name = "first-rank"
    gathers_tokens = True
    static_shapes = True

    def __init__(self, ranks: int):
        self.ranks = ranks

    def gather(self, x_TD, index_TK, weights_TK, num_experts):
        local = num_experts // self.ranks
        keep_TK = index_TK < local
        return GatheredTokens(x_TD, torch.where(keep_TK, index_TK, local), torch.where(keep_TK, weights_TK, 0.0),
                              keep_TK, local)

    def scatter(self, out_TD):
        return out_TD


def time_fwd_bwd(fn, module, x, index, weights, iters: int) -> float:
    """Median ms of forward + backward, the routing weights trained as by a router, no gradient accumulation."""
    grad = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=torch.Generator(x.device).manual_seed(1))
    times = []
    for i in range(iters + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        xx = x.detach().requires_grad_(True)
        ww = weights.detach().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        start.record()
        fn(xx, index, ww).backward(grad)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_table(fn, x, index, weights, rows: int = 25) -> str:
    """One forward+backward under torch.profiler: the kernels by total GPU time."""
    from torch.profiler import ProfilerActivity, profile

    grad = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x.detach().requires_grad_(True), index, weights.detach().requires_grad_(True)).backward(grad)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)


def compiled(module):
    return torch.compile(lambda x, index, weights: fast_experts_forward(module, x, index, weights), dynamic=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per rank")
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    add_shape_arguments(parser)
    parser.add_argument("--profile", action="store_true", help="print each layout's top kernels (one fwd+bwd)")
    parser.add_argument("--kernels", default="torch,row-sum,row-sum+bounded",
                        help="comma-separated: torch (Inductor gathers and sums), row-sum (Triton K-way row sums and "
                             "dots), row-sum+bounded (and the row-bounded kernels of the gathered path)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    device, bf16 = torch.device("cuda"), torch.bfloat16
    result = {"shape": vars(args), "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    layouts = [("local", 1)] + [(f"gathered W={ranks}", ranks) for ranks in args.ranks]
    backends = [b for b in args.kernels.split(",") if b]
    unknown = [b for b in backends if b not in ("torch", "row-sum", "row-sum+bounded")]
    if unknown:
        parser.error(f"unknown --kernels entry {unknown[0]!r}: use torch, row-sum, row-sum+bounded")
    usable = {"row_sum": row_sum.usable, "bounded": bounded_rows.usable}
    off = lambda *tensors: False  # noqa: E731
    for backend in backends:
        row_sum.usable = usable["row_sum"] if backend != "torch" else off
        bounded_rows.usable = usable["bounded"] if backend == "row-sum+bounded" else off
        torch._dynamo.reset()
        for layout, ranks in layouts:
            group_args = argparse.Namespace(**{**vars(args), "tokens": args.tokens * ranks})
            x, index, weights = routing(group_args, device)
            experts = build(args, device, bf16)
            if ranks > 1:
                for name, param in stacked_expert_params(experts):
                    setattr(experts, name, torch.nn.Parameter(rank_experts(param, 0, ranks)))
                experts.moe_dispatcher = FirstRankOfW(ranks)
            set_fused_experts(experts, True, "liger")
            fn = compiled(experts)
            ms = time_fwd_bwd(fn, experts, x.to(bf16), index, weights.to(bf16), args.iters)
            if args.profile:
                print(f"{layout}, kernels {backend}:\n" + kernel_table(fn, x.to(bf16), index, weights.to(bf16)))
            result["rows"].append({"layout": layout, "kernels": backend, "tokens": args.tokens * ranks,
                                   "experts_here": args.experts // ranks,
                                   "rows_computed": int((index < args.experts // ranks).sum()), "ms": ms})
    row_sum.usable, bounded_rows.usable = usable["row_sum"], usable["bounded"]
    base = {row["kernels"]: row["ms"] for row in result["rows"] if row["layout"] == "local"}
    print(f"{'layout':<14}{'kernels':>17}{'tokens':>8}{'experts':>9}{'fwd+bwd ms':>12}{'vs local':>10}")
    for row in result["rows"]:
        print(f"{row['layout']:<14}{row['kernels']:>17}{row['tokens']:>8}{row['experts_here']:>9}{row['ms']:>12.3f}"
              f"{row['ms'] / base[row['kernels']]:>10.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
