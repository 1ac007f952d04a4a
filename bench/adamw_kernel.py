"""AdamW update of one decoder layer's parameters: torch's fused kernel vs the Triton kernel (trainer.kernels.adamw).

    python bench/adamw_kernel.py [--layers 1] [--iters 20] [--sweep] [--out adamw_kernel.json]

The tensors are those of one Qwen3-30B-A3B decoder layer (128 experts, hidden 2048, expert width 768; 0.63B
parameters), bf16 parameters, gradients and states as in the benchmark recipe, plus an fp32-master run (fp32
weights and states, bf16 gradients, the bf16 weight written back). Timed with CUDA events, median of --iters after
5 warm-up updates; bandwidth counts the bytes each update must move (read weight, gradient and both states; write
weight and both states; + the bf16 weight for the master copy). --sweep also times the Triton kernel with the other
launch shapes it offers (`trainer.kernels.adamw.LAUNCH_SHAPES`) and names the fastest.
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

HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
SWEEP = [adamw_kernel.launch_config(shape) for shape in adamw_kernel.LAUNCH_SHAPES if shape != "default"]
QWEN3_LAYER = [128 * 2048 * 1536, 128 * 768 * 2048, 4096 * 2048, 512 * 2048, 512 * 2048, 2048 * 4096, 128 * 2048,
               128, 128, 2048, 2048]


def _tensors(numels, dtype, grad_dtype):
    params = [torch.randn(n, device="cuda", dtype=dtype) for n in numels]
    grads = [torch.randn(n, device="cuda", dtype=grad_dtype) for n in numels]
    return params, grads, [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]


def measure(layers: int, iters: int, master: bool, sweep: bool = False) -> dict:
    numels = QWEN3_LAYER * layers
    dtype = torch.float32 if master else torch.bfloat16
    params, grads, exp_avgs, exp_avg_sqs = _tensors(numels, dtype, torch.bfloat16)
    weights = [p.to(torch.bfloat16) for p in params] if master else None
    step = torch.ones((), device="cuda")

    def torch_kernel():
        used = [g.float() for g in grads] if master else grads
        torch._fused_adamw_(params, used, exp_avgs, exp_avg_sqs, [], [step] * len(params), amsgrad=False,
                            maximize=False, **HYPER)
        if master:
            torch._foreach_copy_(weights, params)

    def triton_kernel(config=None):
        for i in range(len(params)):
            adamw_kernel.adamw_(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], step,
                                shadow=weights[i] if master else None, config=config, **HYPER)

    count = sum(numels)
    size = 4 if master else 2
    moved = count * (size * 6 + 2 + (2 if master else 0))
    row = {"params": count, "master_fp32": master, "bytes": moved}
    for name, fn in (("torch", torch_kernel), ("triton", triton_kernel)):
        ms = median_ms(fn, iters, warmup=5)
        row[f"{name}_ms"] = ms
        row[f"{name}_tb_s"] = moved / ms / 1e9
    if sweep:
        row["sweep"] = [{**config, "ms": median_ms(lambda: triton_kernel(config), iters, warmup=5)}
                        for config in SWEEP]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="time the Triton kernel with other launch shapes too")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not adamw_kernel.available():
        print("needs a CUDA GPU and triton", file=sys.stderr)
        return 2
    rows = [measure(args.layers, args.iters, master, args.sweep) for master in (False, True)]
    print(f"AdamW on {rows[0]['params'] / 1e9:.2f}B parameters ({torch.cuda.get_device_name()}):")
    print(f"{'recipe':<28}{'torch ms':>10}{'TB/s':>7}{'triton ms':>11}{'TB/s':>7}{'speed-up':>10}")
    for row in rows:
        recipe = "fp32 master, bf16 grads" if row["master_fp32"] else "bf16 weights and states"
        print(f"{recipe:<28}{row['torch_ms']:>10.2f}{row['torch_tb_s']:>7.2f}{row['triton_ms']:>11.2f}"
              f"{row['triton_tb_s']:>7.2f}{row['torch_ms'] / row['triton_ms']:>9.2f}x")
        for entry in sorted(row.get("sweep", []), key=lambda e: e["ms"])[:2]:
            print(f"{'':>28}Triton with BLOCK={entry['BLOCK']}, num_warps={entry['num_warps']}: "
                  f"{entry['ms']:.2f} ms ({row['bytes'] / entry['ms'] / 1e9:.2f} TB/s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
