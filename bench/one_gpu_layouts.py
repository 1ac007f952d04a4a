"""One GPU, one job, ours only: the plain model against the replicated model with split experts in a one-rank
group, and the Triton row sums against torch's.

A one-rank group runs every piece of the expert-parallel path (replicas' optimizer, dispatcher, collectives) with
nothing to send, so the difference to `plain` is the path's own cost on the GPU; `--row-sum torch` turns the Triton
K-way row sums (`trainer.kernels.row_sum`) off, for a same-process comparison. Each run is a fresh process.

    python bench/one_gpu_layouts.py --job B1-bs4 --variant best --modes plain,allgather,alltoall
    python bench/one_gpu_layouts.py --job B1-bs4 --modes plain --row-sum torch,triton
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODES = ("plain", "allgather", "alltoall", "deepep")
FIELDS = ("tok_s_per_gpu", "peak_gib", "peak_rss_gib", "loss_last", "mfu", "notes", "error", "step_s_all")


def worker(job: str, variant: str, mode: str, row_sum_backend: str, steps: int, warmup: int) -> dict:
    import socket

    import torch
    import torch.distributed as dist

    import bench.runner as runner

    if row_sum_backend == "torch":
        from trainer.kernels import row_sum

        row_sum.usable = lambda *tensors: False
    if mode != "plain":
        from trainer.parallel.replicate import replicate
        from trainer.parallel.replicate_experts import split_experts

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{port}")
        build = runner._build_ours

        def build_split(*args, **kwargs):
            model = build(*args, **kwargs)
            replicate(model, shard_optimizer=True)
            split_experts(model, mode)
            return model

        runner._build_ours = build_split
    result = runner.run(runner.RunSpec(job=job, side="ours", variant=variant, steps=steps, warmup=warmup))
    return {key: result.get(key) for key in FIELDS}


def _summary(result: dict) -> str:
    if result.get("error"):
        return f"error: {result['error']}"
    peak = result.get("peak_gib") or result.get("peak_rss_gib") or 0.0
    return f"{result['tok_s_per_gpu']:>9,.0f} tok/s  {peak:.1f} GiB  loss {result['loss_last']:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="B1-bs4")
    parser.add_argument("--variant", default="best")
    parser.add_argument("--modes", default="plain,allgather", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--row-sum", default="triton", help="comma-separated, of triton, torch")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, backend = args.worker.split(":")
        print("RESULT " + json.dumps(worker(args.job, args.variant, mode, backend, args.steps, args.warmup)))
        return 0
    modes = [m for m in args.modes.split(",") if m]
    backends = [b for b in args.row_sum.split(",") if b]
    unknown = [m for m in modes if m not in MODES] + [b for b in backends if b not in ("triton", "torch")]
    if unknown:
        parser.error(f"unknown mode or row-sum backend {unknown[0]!r}: modes {', '.join(MODES)}; row sums triton, torch")
    rows = []
    for backend in backends:
        for mode in modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--job", args.job, "--variant", args.variant,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--worker", f"{mode}:{backend}"]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                result = json.loads(lines[-1][7:]) if lines else {"error": (proc.stderr or proc.stdout)[-600:]}
            except subprocess.TimeoutExpired:
                result = {"error": f"timed out after {args.timeout:.0f} s"}
            rows.append({"mode": mode, "row_sum": backend, **result})
            print(f"{mode:<10} row sums {backend:<7} {_summary(result)}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"job": args.job, "variant": args.variant, "rows": rows}, f, indent=2)
    return 0 if all(not row.get("error") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
