"""The benchmark jobs by name: model config, tokens per step, number of GPUs, and the recipe both sides run.

B1-*  Qwen3-30B-A3B shapes with 12 layers (8.1B parameters), seq 4096, micro-batch 1/2/4, one GPU.
B2    the B1 shape on two GPUs of one host (torchrun), EP=2 + FSDP2, micro-batch 4 per GPU.
B3    Nemotron-3-Nano shapes, 6 layers [mamba, moe, mamba, moe, attention, moe], seq 4096, one GPU.
B4-lora  the full Qwen3-30B-A3B shape (48 layers), LoRA r=16 on attention + routed experts, seq 4096, bs1, one GPU;
         activations checkpointed on both sides (HF gradient checkpointing natively); native is transformers + PEFT
         (`get_peft_model`, target_parameters on grouped_mm experts).
smoke a tiny Qwen3-MoE (CPU, seconds): checks the whole pipeline, numbers meaningless (smoke-lora: with LoRA).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


@dataclass(frozen=True)
class Job:
    name: str
    config_file: str | None
    overrides: dict = field(default_factory=dict)
    batch_size: int = 1
    seq_len: int = 4096
    gpus: int = 1
    description: str = ""
    words: tuple[int, int] = (200, 1200)  # words per generated conversation (bench/chat_data.py)
    recipe_overrides: tuple[str, ...] = ()  # part of the job's recipe, so both sides read them (the lora section)


def _config_path(file_name: str) -> str:
    """Prefer the project's shipped copy (trainer/assets/model-configs), else bench/configs."""
    for folder in (os.path.join(REPO, "trainer", "assets", "model-configs"), os.path.join(HERE, "configs")):
        path = os.path.join(folder, file_name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(file_name)


_QWEN = "qwen3-30b-a3b.json"
_NEMOTRON = "nemotron-3-nano-30b-a3b.json"
_B1 = {"num_hidden_layers": 12}
_B3 = {"hybrid_override_pattern": "MEME*E", "num_hidden_layers": 6}
_LORA = ("lora.enabled=true", "lora.rank=16", "lora.alpha=32", "lora.targets=[attention,experts]")
# B4 checkpoints every layer as the one-GPU LoRA preset does (48 layers of activations do not fit beside the base).
_LORA_48 = _LORA + ("parallel.activation_checkpointing=full",)
SMOKE_OVERRIDES = dict(
    vocab_size=1024, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
    max_position_embeddings=128,
)

JOBS = {
    "B1-bs1": Job("B1-bs1", _QWEN, _B1, 1, 4096, 1, "Qwen3-30B-A3B shape, 12 layers, bs1, seq 4096"),
    "B1-bs2": Job("B1-bs2", _QWEN, _B1, 2, 4096, 1, "Qwen3-30B-A3B shape, 12 layers, bs2, seq 4096"),
    "B1-bs4": Job("B1-bs4", _QWEN, _B1, 4, 4096, 1, "Qwen3-30B-A3B shape, 12 layers, bs4, seq 4096"),
    "B1-8L-bs1": Job("B1-8L-bs1", _QWEN, {"num_hidden_layers": 8}, 1, 4096, 1, "Qwen3-30B-A3B shape, 8 layers, bs1"),
    "B2": Job("B2", _QWEN, _B1, 4, 4096, 2, "B1 shape on 2 GPUs, EP=2 + FSDP2, bs4 per GPU"),
    "B3": Job("B3", _NEMOTRON, _B3, 1, 4096, 1, "Nemotron-3-Nano shapes, 6 layers MEME*E, bs1, seq 4096"),
    "B4-lora": Job("B4-lora", _QWEN, {}, 1, 4096, 1, "Qwen3-30B-A3B shape, 48 layers, LoRA r=16 attention + experts, "
                   "bs1, seq 4096, activations checkpointed", recipe_overrides=_LORA_48),
    "smoke": Job("smoke", _QWEN, SMOKE_OVERRIDES, 2, 64, 1, "tiny Qwen3-MoE on CPU (pipeline check)", (8, 20)),
    "smoke-lora": Job("smoke-lora", _QWEN, SMOKE_OVERRIDES, 2, 64, 1, "tiny Qwen3-MoE, LoRA (pipeline check)",
                      (8, 20), _LORA),
    "smoke-ep2": Job("smoke-ep2", _QWEN, SMOKE_OVERRIDES, 2, 64, 2, "tiny Qwen3-MoE, 2 processes, EP=2 + FSDP2",
                     (8, 20)),
}


def config_dict(job: Job) -> dict:
    """The job's HF config as a plain dict (published values, then the job's overrides; '_' keys dropped)."""
    with open(_config_path(job.config_file)) as f:
        values = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    values.update(job.overrides)
    if job.name.startswith("smoke"):
        values["tie_word_embeddings"] = False
    return values


def build_config(job: Job):
    """A transformers config object for the job (no network: the class comes from `model_type`)."""
    from transformers import AutoConfig

    values = config_dict(job)
    model_type = values.pop("model_type")
    values.pop("architectures", None)
    config = AutoConfig.for_model(model_type, **values)
    config.use_cache = False
    return config


def resolve(names: str) -> list[Job]:
    """'B1-bs1,B1-bs4' -> jobs; unknown names raise ValueError listing the known ones."""
    jobs = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in JOBS:
            raise ValueError(f"unknown job {name!r}: choose from {', '.join(JOBS)}")
        jobs.append(JOBS[name])
    return jobs


# Named variants of ours: lists of recipe overrides on top of the job's recipe ("default": `moe train` as is).
VARIANTS = {
    "default": [],
    "overlap": ["perf.optimizer=overlap", "optim.max_grad_norm=0"],
    "no-graphs": ["perf.compile=layers"],
    # CUDA-graph layers beside AdamW after the backward (clipping kept; updates inside the step)
    "graphs": ["perf.compile=layers-graphs"],
    "eager": ["perf.compile=off"],
    # every layer's AdamW held back to the next forward, on a side stream under it (clipping kept): what perf auto
    # picks on CUDA beside AdamW after the backward; "no-defer" is the update inside the step
    "defer": ["perf.defer=all"],
    "no-defer": ["perf.defer=none"],
    # several GPUs: the whole model on every GPU, gradients averaged in the backward (docs/DISTRIBUTED.md)
    "replicate": ["parallel.layout=replicate", "parallel.ep_size=1", "perf.optimizer=overlap", "optim.max_grad_norm=0"],
}


def write_job_recipe(job: Job, out_dir: str, steps: int, overrides: list[str] | None = None) -> str:
    """Write the job's model config, training data and recipe under `out_dir/<job>/`; returns the recipe's path.

    The recipe is what `moe train` runs for every "ours" row and what the native baseline reads: random init from
    the job's config (bf16 weights, bf16 AdamW states, as the native baseline keeps them), the generated chat data
    packed to the job's sequence length, `steps` optimizer steps at a constant lr with clipping at 1.0, no
    checkpoint, no export. The job's own `recipe_overrides`, then `overrides` (e.g. parallel.ep_size=2 for a
    two-GPU job), are written into it."""
    import yaml

    from bench.chat_data import write_chat_data
    from trainer.config import load_recipe

    gpu_job = job.name[:2] in ("B1", "B2", "B3", "B4")
    folder = os.path.join(out_dir, job.name)
    model_dir = os.path.join(folder, "model")
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump({**config_dict(job), "use_cache": False}, f, indent=1)
    data = write_chat_data(os.path.join(out_dir, "data", f"chat-{job.words[0]}-{job.words[1]}.jsonl"),
                           words=job.words)
    recipe = {
        "model": {"name_or_path": os.path.abspath(model_dir), "tokenizer": "builtin:tokenizer", "from_config": True,
                  "dtype": "bfloat16" if gpu_job else "auto"},
        "data": {"train_path": os.path.abspath(data), "format": "chat", "seq_len": job.seq_len, "packing": True},
        "optim": {"lr": 1.0e-4, "weight_decay": 0.0, "betas": [0.9, 0.95], "warmup_steps": 0, "min_lr_ratio": 1.0,
                  "max_grad_norm": 1.0},
        "train": {"micro_batch_size": job.batch_size, "grad_accum_steps": 1, "max_steps": steps, "seed": 0,
                  "precision": "bf16" if gpu_job else "auto", "log_every": 1},
        "checkpoint": {"every_steps": 0, "resume": "never", "save_final": False},
        "output": {"dir": os.path.abspath(os.path.join(folder, "runs", "default")), "export": False,
                   "overwrite": True},
        "parallel": {"check_memory": False},
    }
    path = os.path.join(folder, "recipe.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f, sort_keys=False)
    overrides = [*job.recipe_overrides, *(overrides or [])]
    if overrides:
        merged = load_recipe(path, overrides).to_dict()
        with open(path, "w") as f:
            yaml.safe_dump(merged, f, sort_keys=False)
    return path
