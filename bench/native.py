"""The baseline: transformers v5 native training on a benchmark job's recipe, in this process.

    result = run_native("runs/bench/B1-bs4/recipe.yaml", warmup=5, steps=20)

The same recipe `moe train` runs for the "ours" rows (bench/jobs.py writes it): the same model config (random init,
seed), the same batches from the trainer's own data pipeline (chat template, loss mask, packing with position ids),
the same optimizer hyper-parameters and clipping. The model is transformers' own: `AutoModelForCausalLM` with
the recipe's attention (`trainer.build.attention_implementation`, as `moe train` settles it),
`experts_implementation="grouped_mm"` (the v5 default), weights and autocast as the trainer resolves the recipe's
precision (`trainer.runtime.resolve_precision`: bf16 in the GPU jobs, fp32 in the CPU smoke), the loss from
`labels` (the trainer's shifted targets unshifted) with `output_router_logits=True`, `torch.optim.AdamW` (fused on
CUDA, its fastest kernel) over the trainable parameters, `clip_grad_norm_` when the recipe clips, HF's `gradient_checkpointing_enable` (non-reentrant, every decoder layer: its
one granularity) when the recipe checkpoints activations at all. With the recipe's
`lora.enabled`, the model is PEFT's `get_peft_model` with the same targets, rank and alpha (`trainer.lora.targets`):
routed experts through `target_parameters`, i.e. PEFT's dense W + B A per expert beside `grouped_mm`. On several GPUs (torchrun) the model goes through
HF's own `DistributedConfig`. Timing: CUDA-synchronised wall time per optimizer step, median after warm-up; peak
memory: `torch.cuda.max_memory_allocated` over the whole run.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
import traceback

import torch

from trainer import flops
from trainer.build import attention_implementation, load_model_config, load_tokenizer
from trainer.config import load_recipe, resolve_path
from trainer.data import IGNORE_INDEX, StatefulLoader, build_dataset
from trainer.runtime import resolve_precision, seed_everything


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def native_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trainer's micro-batch (targets already shifted) as HF's arguments: labels[t] is the target of t - 1."""
    targets = batch["targets"]
    labels = torch.full_like(targets, IGNORE_INDEX)
    labels[:, 1:] = targets[:, :-1]
    return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "labels": labels}


def _build(config, device: torch.device, layout: str, attention: str, notes: list[str], dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    if getattr(config, "model_type", None) == "nemotron_h":  # native uses mamba_ssm/causal_conv1d when installed
        from trainer.kernels import mamba

        used = mamba.expose_to_transformers()
        notes.append(f"native Mamba2 path: {'mamba_ssm + causal_conv1d kernels' if used else 'torch'}")
    kwargs = dict(dtype=dtype, attn_implementation=attention, experts_implementation="grouped_mm")
    notes.append(f"attention: {attention}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, **kwargs)
    return _build_distributed(config, device, layout, kwargs, notes)


def _build_distributed(config, device, layout: str, kwargs: dict, notes: list[str]):
    """HF's own distributed path: save the random model once, reload it with a DistributedConfig ("ep": tp_size=world
    with expert parallelism, as transformers 5.17 has it; "fsdp": fsdp_size=world). Peak memory is reset after."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DistributedConfig

    world = dist.get_world_size()
    folder = os.path.join(os.environ.get("BENCH_CKPT_DIR", "/tmp/bench-ckpt"), f"{config.model_type}-{world}")
    if dist.get_rank() == 0 and not os.path.exists(os.path.join(folder, "config.json")):
        with torch.device(device):
            AutoModelForCausalLM.from_config(config, dtype=kwargs["dtype"]).save_pretrained(folder)
        gc.collect()
        torch.cuda.empty_cache()
    dist.barrier()
    distributed = (DistributedConfig(tp_size=world, enable_expert_parallel=True) if layout == "ep"
                   else DistributedConfig(fsdp_size=world))
    model = AutoModelForCausalLM.from_pretrained(folder, distributed_config=distributed, **kwargs)
    torch.cuda.reset_peak_memory_stats(device)
    notes.append(f"native {layout} via DistributedConfig; peak reset after loading")
    return model


def _with_peft_lora(model, lora_cfg, notes: list[str]):
    """The transformers + PEFT way: `get_peft_model` (adapters in fp32 over the bf16 base, the rest frozen)."""
    from peft import get_peft_model

    from trainer.lora.targets import peft_config

    model = get_peft_model(model, peft_config(model, lora_cfg))
    notes.append(f"native LoRA: PEFT get_peft_model, r={lora_cfg.rank}, targets {','.join(lora_cfg.targets)}")
    return model


def run_native(recipe_path: str, warmup: int, steps: int, layout: str = "fsdp") -> dict:
    """Train the recipe's job natively for warmup + steps optimizer steps; returns a JSON-able result (an "error"
    key instead of numbers if it failed)."""
    device = _device()
    result = {"side": "native", "notes": [], "recipe": recipe_path}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        _measure(load_recipe(recipe_path), device, warmup, steps, layout, result)
    except torch.cuda.OutOfMemoryError as err:
        result["error"] = "OOM: " + str(err).splitlines()[0][:300]
    except Exception as err:  # one failing run must not sink the comparison
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        result["traceback"] = traceback.format_exc()[-4000:]
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def _measure(recipe, device: torch.device, warmup: int, steps: int, layout: str, result: dict) -> None:
    seed_everything(recipe.train.seed)
    config = load_model_config(recipe.model)
    tokenizer = load_tokenizer(recipe.model)
    data = recipe.data
    dataset = build_dataset(resolve_path(data.train_path), tokenizer, data.seq_len, data.format, data.long_samples)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    loader = StatefulLoader(dataset, data.seq_len, recipe.train.micro_batch_size, tokenizer.pad_token_id,
                            data.packing, data.shuffle, recipe.train.seed, rank, world)
    attention = attention_implementation(recipe.model, device, data.packing, config)
    precision, dtype = resolve_precision(recipe, device)  # the trainer's resolution of precision and model.dtype
    model = _build(config, device, layout, attention, result["notes"], dtype).train()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())
    if recipe.parallel.activation_checkpointing != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        result["notes"].append("gradient checkpointing: HF, every decoder layer")
    if recipe.lora.enabled:
        model = _with_peft_lora(model, recipe.lora, result["notes"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = recipe.optim
    fused = {"fused": True} if device.type == "cuda" and world == 1 else {"foreach": world == 1}
    optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                  weight_decay=optim.weight_decay, **fused)
    kwargs = {"output_router_logits": True} if hasattr(model.config, "output_router_logits") else {}
    aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
    times, losses = [], []  # losses: the cross-entropy part (the trainer's metrics report it without the aux loss)
    for i in range(warmup + steps):
        batches = [native_batch({k: v.to(device) for k, v in next(loader).items()})
                   for _ in range(recipe.train.grad_accum_steps)]
        _sync(device)
        started = time.perf_counter()
        loss_sum = 0.0
        for batch in batches:
            with autocast:
                out = model(**batch, use_cache=False, **kwargs)
            (out.loss / len(batches)).backward()
            aux = getattr(out, "aux_loss", None)
            ce = out.loss.detach() - (aux_coef * aux.detach() if aux is not None else 0.0)
            loss_sum = loss_sum + ce / len(batches)
        if optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum))
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
    step_s = statistics.median(times)
    tokens = recipe.train.micro_batch_size * data.seq_len * recipe.train.grad_accum_steps
    tok_s = tokens / step_s
    result.update({"step_s": step_s, "step_s_all": times, "tok_s_per_gpu": tok_s, "loss_last": losses[-1],
                   "losses": losses, "params": sum(p.numel() for p in model.parameters()),
                   **flops.throughput_metrics(config, data.seq_len, tok_s)})
