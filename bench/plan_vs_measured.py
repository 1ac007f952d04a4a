"""Predicted (trainer.planner) vs measured (`torch.cuda.max_memory_allocated`) peak memory, one GPU.

Runs each configuration in turn in one process (memory freed in between): random-init model from its config,
3 training steps (forward with labels, backward, AdamW step, zero_grad), and compares the peak with the planner's
estimate for the same layout. Writes a JSON list of rows to --out.

    python bench/plan_vs_measured.py --out plan_vs_measured.json                 # the default list below
    python bench/plan_vs_measured.py --out x.json --config model=qwen3-30b-a3b,layers=12,mb=2,ckpt=full,precision=bf16

A configuration is `key=value` pairs separated by commas:
  model      shipped config name or path (qwen3-30b-a3b, nemotron-3-nano, ...)
  layers     num_hidden_layers override (Nemotron-H: the first N letters of the pattern)   pattern  Nemotron-H pattern
  mb         micro-batch size                       seq        sequence length (default 4096)
  ckpt       none | selective (experts recomputed) | full (every decoder layer recomputed)
  precision  bf16 (bf16 params, AdamW states in bf16: the benchmark protocol's baseline) |
             bf16-mixed (fp32 master params, FSDP2 MixedPrecisionPolicy(bf16 params, fp32 reduce) on a 1-rank mesh,
             fp32 AdamW states)
  impl       moe_fast (trainer.models.MoEAutoModelForCausalLM; default) | hf (transformers grouped_mm)
The training loop keeps only the loss (outputs are dropped before backward), AdamW is foreach (torch's default).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from trainer.planner import Layout, PlanOptions, estimate_memory, load_model_config, shape_from_config  # noqa: E402

GiB = 1024**3
DEFAULT_CONFIGS = [  # a mix of peaks at the optimizer step and at the start of the backward
    "model=qwen3-30b-a3b,layers=12,mb=1,ckpt=none,precision=bf16",
    "model=qwen3-30b-a3b,layers=12,mb=2,ckpt=none,precision=bf16",
    "model=qwen3-30b-a3b,layers=8,mb=4,ckpt=full,precision=bf16",
    "model=qwen3-30b-a3b,layers=4,mb=4,ckpt=none,precision=bf16",
    "model=qwen3-30b-a3b,layers=4,mb=4,ckpt=selective,precision=bf16",
    "model=qwen3-30b-a3b,layers=4,mb=8,ckpt=full,precision=bf16",
    "model=qwen3-30b-a3b,layers=2,mb=4,ckpt=none,precision=bf16-mixed",
    "model=qwen3-30b-a3b,layers=4,mb=4,ckpt=full,precision=bf16-mixed",
    "model=nemotron-3-nano,pattern=MEME*E,mb=1,ckpt=none,precision=bf16",
    "model=nemotron-3-nano,pattern=MEME*E,mb=4,ckpt=selective,precision=bf16",
]


def parse_config(spec: str) -> dict:
    fields = dict(part.split("=", 1) for part in spec.split(",") if part)
    fields.setdefault("mb", "1")
    fields.setdefault("seq", "4096")
    fields.setdefault("ckpt", "none")
    fields.setdefault("precision", "bf16")
    fields.setdefault("impl", "moe_fast")
    return fields


def config_overrides(spec: dict) -> dict:
    overrides = {}
    if "layers" in spec:
        overrides["num_hidden_layers"] = int(spec["layers"])
    if "pattern" in spec:
        overrides["hybrid_override_pattern"] = spec["pattern"]
    return overrides


def predict(spec: dict, config_dict: dict) -> tuple[float, str]:
    shape = shape_from_config(config_dict)
    layout = Layout(1, micro_batch=int(spec["mb"]), seq_len=int(spec["seq"]), checkpointing=spec["ckpt"])
    options = PlanOptions(precision=spec["precision"], capacity_factor=1.0, keep_outputs=False,
                          fsdp=spec["precision"] == "bf16-mixed")
    memory = estimate_memory(shape, layout, options)
    return memory.total / GiB, memory.phase


def hf_config(config_dict: dict):
    import transformers

    fields = dict(config_dict)
    config = transformers.CONFIG_MAPPING[fields.pop("model_type")](**fields)
    config._attn_implementation = "sdpa"
    if hasattr(config, "output_router_logits"):
        config.output_router_logits = True  # the aux loss, as the benchmark protocol runs it
    return config


def build_model(config, spec: dict):
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    kwargs = dict(dtype=dtype, attn_implementation="sdpa")
    with torch.device("cuda"):
        if spec["impl"] == "moe_fast":
            try:
                from trainer.models import MoEAutoModelForCausalLM

                return MoEAutoModelForCausalLM.from_config(config, **kwargs), "moe_fast"
            except ImportError as err:
                print(f"  trainer model unavailable ({err}); using transformers grouped_mm", flush=True)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm", **kwargs), "grouped_mm"


def decoder_layers(model) -> list:
    return list(model.model.layers)


def apply_checkpointing(model, mode: str) -> None:
    from torch.utils.checkpoint import checkpoint

    if mode == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif mode == "selective":  # recompute the routed experts (dispatch included) and the shared expert
        for module in model.modules():
            if type(module).__name__.endswith("Experts"):
                _wrap_forward(module, checkpoint)
        for layer in decoder_layers(model):
            mixer = getattr(layer, "mixer", None) or getattr(layer, "mlp", None)
            shared = getattr(mixer, "shared_experts", None) or getattr(mixer, "shared_expert", None)
            if shared is not None and not getattr(shared, "_planner_ckpt", False):
                _wrap_forward(shared, checkpoint)
    model.train()


def _wrap_forward(module, checkpoint) -> None:
    if getattr(module, "_planner_ckpt", False):
        return
    inner = module.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward
    module._planner_ckpt = True


def apply_fsdp_mixed_precision(model) -> None:
    """fp32 master params, bf16 compute: FSDP2 per decoder layer + root, on a 1-rank mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)
    mesh = init_device_mesh("cuda", (1,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def measure(spec: dict, config_dict: dict, steps: int = 3) -> dict:
    config = hf_config(config_dict)
    model, impl = build_model(config, spec)
    apply_checkpointing(model, spec["ckpt"])
    if spec["precision"] == "bf16-mixed":
        apply_fsdp_mixed_precision(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, foreach=True)
    tokens = int(spec["mb"]) * int(spec["seq"])
    generator = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (int(spec["mb"]), int(spec["seq"])), device="cuda",
                            generator=generator)
        loss = model(input_ids=ids, labels=ids).loss  # the outputs (logits) are dropped here, as the trainer does
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / GiB
    del model, optimizer, loss
    return {"measured_gib": peak, "experts_impl": impl, "losses": losses, "tok_per_s_rough": tokens / seconds}


def free_memory() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def mamba_kernels_available() -> bool:
    try:
        import causal_conv1d  # noqa: F401
        import mamba_ssm  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write the rows to")
    parser.add_argument("--config", action="append", help="a configuration (repeatable); default: the built-in list")
    parser.add_argument("--impl", choices=("moe_fast", "hf"), default=None, help="override impl for every config")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    header = f"{'configuration':<72} {'predicted':>9} {'measured':>9} {'error':>7}  peak at"
    print(header + "\n" + "-" * len(header), flush=True)
    for text in args.config or DEFAULT_CONFIGS:
        spec = parse_config(text)
        if args.impl:
            spec["impl"] = args.impl
        config_dict = load_model_config(spec["model"], config_overrides(spec))
        predicted, phase = predict(spec, config_dict)
        row = {"config": text, "spec": spec, "predicted_gib": predicted, "predicted_phase": phase}
        if config_dict.get("model_type") == "nemotron_h" and not mamba_kernels_available():
            row["note"] = "mamba_ssm/causal_conv1d missing: torch fallback is not modeled by the planner"
        try:
            row.update(measure(spec, config_dict, args.steps))
            row["error"] = row["predicted_gib"] / row["measured_gib"] - 1
            line = f"{row['predicted_gib']:9.1f} {row['measured_gib']:9.1f} {row['error'] * 100:+6.1f}%  {phase}"
        except torch.OutOfMemoryError:
            row["measured_gib"], row["error"] = None, None
            line = f"{predicted:9.1f} {'OOM':>9} {'':>7}  {phase}"
        free_memory()
        rows.append(row)
        print(f"{text:<72} {line}" + (f"  ({row['note']})" if "note" in row else ""), flush=True)
        with open(args.out, "w") as out:  # rewritten after each row: a crash keeps what was measured
            json.dump(rows, out, indent=2)
    errors = [abs(r["error"]) for r in rows if r.get("error") is not None]
    if errors:
        print(f"\nmax |error| {max(errors) * 100:.1f}% over {len(errors)} configurations; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
