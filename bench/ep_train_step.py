"""Training steps of the Qwen3-30B-A3B shape (12 layers) with EP=2 + FSDP2, all-to-all vs DeepEP dispatcher.

    torchrun --nproc-per-node 2 bench/ep_train_step.py --out ep_train_step.json

Random bf16-mixed weights (fp32 master, bf16 compute, fp32 gradient reduction), AdamW, random tokens. For each
dispatcher (DeepEP only where it can run): build the sharded model on the meta device, materialise, run --warmup
steps then --steps timed steps; prints tokens/s per GPU, step time and peak memory, writes JSON.
"""

from __future__ import annotations

import argparse
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


def run(config, dispatcher: str, args, device, world: int) -> dict:
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
    }
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
                  f"{r['peak_memory_gib']:>9.1f} {r['loss']:>8.4f}")
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "world": world, "results": results}, f, indent=2)
    teardown()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
