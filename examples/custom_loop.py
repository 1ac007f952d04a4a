"""Your own training loop, sharded: swap `AutoModelForCausalLM` for `MoEAutoModelForCausalLM` and pass a layout.

    torchrun --nproc-per-node 8 examples/custom_loop.py Qwen/Qwen3-30B-A3B --ep-size 8 --out ./finetuned

Each rank loads only its shard (FSDP2 + expert parallelism); any torch optimizer works on the sharded parameters;
`save_pretrained` on every rank writes one standard Hugging Face checkpoint. On CPU it runs with gloo.
"""

import argparse

import torch
import torch.distributed as dist

from trainer import MoEAutoModelForCausalLM, ParallelConfig
from trainer.parallel import teardown
from trainer.parallel.grad_norm import clip_grad_norm

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("--ep-size", type=int, default=2)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--out", default="finetuned")
args = parser.parse_args()

dtype = torch.float32 if not torch.cuda.is_available() else torch.bfloat16
parallel = ParallelConfig(ep_size=args.ep_size, param_dtype=None if dtype == torch.float32 else "bfloat16")
model = MoEAutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, parallel=parallel).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
device = "cuda" if torch.cuda.is_available() else "cpu"

for step in range(args.steps):
    ids = torch.randint(0, model.config.vocab_size, (2, 64), device=device)  # your data loader here
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    clip_grad_norm(model, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    if dist.get_rank() == 0:
        print(f"step {step}: loss {loss.item():.4f}")

model.save_pretrained(args.out)  # every rank calls it; rank 0 writes
teardown()  # communication buffers (DeepEP) before the process group
dist.destroy_process_group()
