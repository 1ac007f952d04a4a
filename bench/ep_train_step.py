"""Training steps of the Qwen3-30B-A3B shape (12 layers) with EP=2 + FSDP2, all-to-all vs DeepEP dispatcher.

    torchrun --nproc-per-node 2 bench/ep_train_step.py --out ep_train_step.json

Random bf16-mixed weights (fp32 master, bf16 compute, fp32 gradient reduction), AdamW, random tokens. For each
dispatcher (DeepEP only where it can run): build the sharded model on the meta device, materialise, run --warmup
steps then --steps timed steps; prints tokens/s per GPU, step time and peak memory, writes JSON.

Run one dispatcher per process (`--dispatchers deepep`) for a clean peak: memory a first run leaves behind counts
in the second run's peak (`allocated_before_gib` in the JSON says how much). Diagnostics (rank 0, one extra step,
not timed): `--saved` lists the largest tensors autograd saves in the forward (grouped by shape and dtype);
`--profile` lists the top CUDA kernels and the step's total kernel time against its wall time.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from transformers import AutoConfig  # noqa: E402

from trainer.models import MoEAutoModelForCausalLM  # noqa: E402
from trainer.parallel import ParallelConfig, parallelize, teardown  # noqa: E402


def build(config, parallel: ParallelConfig, device):
    with torch.device("meta"):
        model = MoEAutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parallelize(model, parallel)
    model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            local.fill_(1.0) if "norm" in name else local.normal_(std=0.02)
        for module in model.modules():  # rotary inv_freq (to_empty left it uninitialised)
            if getattr(module, "_non_persistent_buffers_set", None):
                model._init_weights(module)
    return model.train()


def saved_tensor_summary(model, ids, top: int = 10) -> list[dict]:
    """The forward's autograd-saved tensors grouped by (shape, dtype), largest total first (each storage once)."""
    seen, groups = set(), {}

    def pack(t):
        try:
            key_ptr = t.untyped_storage().data_ptr()
        except Exception:
            return t
        if key_ptr not in seen:
            seen.add(key_ptr)
            key = (tuple(t.shape), str(t.dtype).replace("torch.", ""))
            count, nbytes = groups.get(key, (0, 0))
            groups[key] = (count + 1, nbytes + t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()  # FSDP2 expects every forward to be followed by its backward
    model.zero_grad(set_to_none=True)
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])
    total = sum(nbytes for _, (_, nbytes) in rows)
    return [{"total_gib": total / 2**30}] + [
        {"shape": list(shape), "dtype": dtype, "count": count, "gib": nbytes / 2**30}
        for (shape, dtype), (count, nbytes) in rows[:top]]


def profile_step(model, optimizer, ids) -> dict:
    """One step under torch.profiler: top kernels by CUDA time, total kernel time and the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    kernels = [e for e in prof.key_averages() if getattr(e, "device_type", None) is not None
               and "CUDA" in str(e.device_type) and e.self_device_time_total > 0]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    return {"wall_ms": wall * 1e3, "kernel_ms": sum(e.self_device_time_total for e in kernels) / 1e3,
            "top": [{"name": e.key[:90], "ms": e.self_device_time_total / 1e3, "calls": e.count} for e in kernels[:15]]}


def run(config, dispatcher: str, args, device, world: int) -> dict:
    allocated_before = torch.cuda.memory_allocated() / 2**30
    parallel = ParallelConfig(ep_size=args.ep, dispatcher=dispatcher, activation_checkpointing=args.ac,
                              param_dtype="bfloat16", reduce_dtype="float32")
    model = build(config, parallel, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    generator = torch.Generator(device=device).manual_seed(dist.get_rank())
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device, generator=generator)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        dist.barrier()
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    result = {
        "dispatcher": getattr(model.model.layers[0].mlp.experts.moe_dispatcher, "name", "local"),
        "step_s": step_s,
        "tokens_per_s_per_gpu": args.batch * args.seq / step_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": loss.item(),
        "allocated_before_gib": allocated_before,
    }
    for flag, key, diagnose in (("saved", "saved_tensors", functools.partial(saved_tensor_summary, model, ids)),
                                ("profile", "profile", functools.partial(profile_step, model, optimizer, ids))):
        if getattr(args, flag):  # every rank runs it (collectives inside); a failure costs the diagnostic only
            try:
                result[key] = diagnose()
            except Exception as err:
                result[key + "_error"] = f"{type(err).__name__}: {err}"[:500]
                print(f"rank {dist.get_rank()}: --{flag} failed: {result[key + '_error']}", flush=True)
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "bench", "configs", "qwen3-30b-a3b.json"))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--ac", default="full", choices=["none", "full", "selective"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dispatchers", default="alltoall,deepep")
    parser.add_argument("--saved", action="store_true", help="list the largest autograd-saved tensors (rank 0)")
    parser.add_argument("--profile", action="store_true", help="top CUDA kernels of one extra step (rank 0)")
    parser.add_argument("--out", default="ep_train_step.json")
    args = parser.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    device, world = torch.device("cuda", local_rank), dist.get_world_size()
    raw = {k: v for k, v in json.load(open(args.config)).items() if not k.startswith("_")}
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, **raw)
    config.num_hidden_layers = args.layers

    results = []
    for dispatcher in args.dispatchers.split(","):
        if dispatcher == "deepep":
            from trainer.parallel.dispatchers import deepep_unavailable_reason

            reason = deepep_unavailable_reason(dist.group.WORLD, "cuda")
            if reason is not None:
                if dist.get_rank() == 0:
                    print(f"deepep skipped: {reason}")
                continue
        results.append({"requested": dispatcher, **run(config, dispatcher, args, device, world)})
    if dist.get_rank() == 0:
        print(f"{'dispatcher':<10} {'tok/s/GPU':>10} {'step s':>8} {'peak GiB':>9} {'loss':>8}")
        for r in results:
            print(f"{r['requested']:<10} {r['tokens_per_s_per_gpu']:>10.0f} {r['step_s']:>8.3f} "
                  f"{r['peak_memory_gib']:>9.1f} {r['loss']:>8.4f}  (allocated before: {r['allocated_before_gib']:.1f} GiB)")
            for row in r.get("saved_tensors", []):
                print("  saved", row)
            if "profile" in r:
                prof = r["profile"]
                print(f"  profile: wall {prof['wall_ms']:.0f} ms, kernels {prof['kernel_ms']:.0f} ms")
                for row in prof["top"]:
                    print(f"    {row['ms']:8.1f} ms {row['calls']:5d}x {row['name']}")
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "world": world, "results": results}, f, indent=2)
    teardown()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
