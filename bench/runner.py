"""One measured run in this process: build the model (native transformers or ours), train N steps, report.

    result = run(RunSpec(job="B1-bs1", side="ours", variant="best", steps=4, warmup=2))

Native follows docs/BENCHMARKS.md exactly: random init from config, sdpa attention, `grouped_mm` experts, bf16
parameters, AdamW(foreach=True), labels=input_ids, output_router_logits=True. Ours: `MoEAutoModelForCausalLM`, sdpa,
the variant's `trainer.perf` options. Both see the same seeded random token ids, step by step.
Timing: CUDA-synchronised wall time per optimizer step, median over the measured steps. Peak memory:
torch.cuda.max_memory_allocated over the whole run (init, warm-up and measured steps).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass

import torch

from trainer import flops
from bench.jobs import JOBS, build_config, config_dict

RESULT_PREFIX = "BENCH_RESULT "


@dataclass
class RunSpec:
    job: str
    side: str  # "native" | "ours"
    variant: str = "base"  # trainer.perf option spec (ours only)
    precision: str = "bf16"  # "bf16": bf16 params + bf16 AdamW states; "master-fp32": + fp32 master weights/states
    steps: int = 4
    warmup: int = 2
    lr: float = 1e-4
    seed: int = 0
    repeat: int = 0
    device: str = "auto"
    profile: bool = False
    layout: str = "ep"  # ours on several GPUs: "ep" (EP over all GPUs + FSDP2), "fsdp" (FSDP2 only), "zero2"

    @property
    def label(self) -> str:
        if self.side == "native":
            return "native" if self.variant in ("base", "") else f"native[{self.variant}]"
        where = "" if JOBS[self.job].gpus == 1 else f"{self.layout}:"
        return f"ours[{where}{self.variant}]" + ("" if self.precision == "bf16" else f"({self.precision})")


def _device(spec: RunSpec) -> torch.device:
    if spec.device != "auto":
        return torch.device(spec.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batches(job, vocab: int, count: int, seed: int, device) -> list[torch.Tensor]:
    """The same token ids for both sides: one seeded generator on the CPU, step by step."""
    g = torch.Generator().manual_seed(1234 + seed)
    return [torch.randint(0, vocab, (job.batch_size, job.seq_len), generator=g).to(device) for _ in range(count)]


def _build_native(config, device, result: dict | None = None):
    from transformers import AutoModelForCausalLM

    if getattr(config, "model_type", None) == "nemotron_h":  # native uses mamba_ssm/causal_conv1d when installed
        from trainer.kernels import mamba

        used = mamba.expose_to_transformers()
        if result is not None:
            result["notes"].append(f"native Mamba2 path: {'mamba_ssm + causal_conv1d kernels' if used else 'torch'}")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 experts_implementation="grouped_mm")
    return model


def _build_native_distributed(config, device, job, layout: str, result: dict):
    """HF's own distributed path (protocol): save the random model once, reload with a DistributedConfig.

    layout "fsdp": DistributedConfig(fsdp_size=world); "ep": tp_size=world + enable_expert_parallel (HF 5.17 rides
    expert parallelism on the tp dimension). Peak memory is reset after loading (the one-off save is not training).
    """
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DistributedConfig

    world = dist.get_world_size()
    folder = os.path.join(os.environ.get("BENCH_CKPT_DIR", "/tmp/bench-ckpt"), job.name)
    if dist.get_rank() == 0 and not os.path.exists(os.path.join(folder, "config.json")):
        with torch.device(device):
            full = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        full.save_pretrained(folder)
        del full
        gc.collect()
        torch.cuda.empty_cache()
    dist.barrier()
    if layout == "ep":
        distributed = DistributedConfig(tp_size=world, enable_expert_parallel=True)
    else:
        distributed = DistributedConfig(fsdp_size=world)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 experts_implementation="grouped_mm", distributed_config=distributed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result["notes"].append(f"native {layout} via DistributedConfig; peak reset after loading")
    return model


def _build_ours(config, device, dtype):
    from trainer.models import MoEAutoModelForCausalLM

    with torch.device(device):
        model = MoEAutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def _native_step(model, ids):
    kwargs = {"output_router_logits": True} if hasattr(model.config, "output_router_logits") else {}
    out = model(input_ids=ids, labels=ids, use_cache=False, **kwargs)
    out.loss.backward()
    aux = getattr(out, "aux_loss", None)
    return out.loss.detach(), aux


def run(spec: RunSpec) -> dict:
    """Build, warm up, measure; returns a JSON-able dict (error key set instead of numbers if it failed)."""
    job = JOBS[spec.job]
    device = _device(spec)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    result = {"spec": asdict(spec), "label": spec.label, "job": job.name, "side": spec.side, "world_size": world,
              "batch_size": job.batch_size, "seq_len": job.seq_len, "config": config_dict(job), "notes": []}
    torch.manual_seed(spec.seed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    try:
        _measure(spec, job, device, world, result)
    except torch.cuda.OutOfMemoryError as err:
        result["error"] = "OOM: " + str(err).splitlines()[0][:300]
    except Exception as err:  # one failing run must not sink the comparison
        result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        result["traceback"] = traceback.format_exc()[-4000:]
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    else:
        import resource

        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process-wide, KiB
    return result


def _measure(spec: RunSpec, job, device, world: int, result: dict) -> None:
    from trainer.perf import PerfOptions, apply_optimizations
    from trainer.step_optimizer import build_optimizer, step_stream

    config = build_config(job)
    started = time.perf_counter()
    options = PerfOptions()
    if spec.side == "native" and world > 1:
        model = _build_native_distributed(config, device, job, "ep" if spec.variant == "ep" else "fsdp", result)
    elif spec.side == "native":
        model = _build_native(config, device, result)
    else:
        options = PerfOptions.parse(spec.variant)
        if spec.precision == "master-fp32":
            options.master = "fp32"
        model = _build_ours(config, device, torch.bfloat16)
        if world > 1:
            _parallelize(model, job, spec.layout)
            result["notes"].append(f"layout: {LAYOUTS[spec.layout]}")
            dispatchers = {m.moe_dispatcher.name for m in model.modules() if getattr(m, "moe_dispatcher", None)}
            if dispatchers:
                result["notes"].append(f"expert-parallel dispatcher: {', '.join(sorted(dispatchers))}")
        apply_optimizations(model, options)
        result["options"] = options.as_dict()
    model.train()
    _sync(device)
    result["init_s"] = time.perf_counter() - started
    result["params"] = sum(p.numel() for p in model.parameters())
    result["param_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    if spec.side == "native":
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, foreach=world == 1)
    else:
        optimizer = build_optimizer(model, options, lr=spec.lr)
    with step_stream(options, device):
        _train_and_time(spec, job, config, model, optimizer, options, device, result)
    del model, optimizer
    gc.collect()


def _train_and_time(spec: RunSpec, job, config, model, optimizer, options, device, result: dict) -> None:
    """The warm-up and measured steps of a built model: step time, host time, losses, throughput (and a profile)."""
    from trainer.perf import disable_compile

    batches = _batches(job, config.vocab_size, spec.warmup + spec.steps, spec.seed, device)
    times, host_times, losses, ces = [], [], [], []
    for i, ids in enumerate(batches):
        _sync(device)
        t0 = time.perf_counter()
        try:
            loss, ce, queued = _one_step(spec, model, optimizer, ids, options)
        except Exception as err:
            if i == 0 and spec.side == "ours" and disable_compile(model):
                options.notes.append(f"compile failed at the first step ({type(err).__name__}): eager instead")
                optimizer.zero_grad(set_to_none=True)
                loss, ce, queued = _one_step(spec, model, optimizer, ids, options)
            else:
                raise
        _sync(device)
        elapsed = time.perf_counter() - t0
        losses.append(float(loss))
        ces.append(float(ce))
        if i >= spec.warmup:
            times.append(elapsed)
            host_times.append(queued - t0)
    tokens = job.batch_size * job.seq_len
    step_s = statistics.median(times)
    tok_s = tokens / step_s
    result.update({
        "step_s": step_s, "step_s_all": times, "tokens_per_step_per_gpu": tokens,
        # host time to queue the whole step (until the loss is read): close to step_s means the host sets the pace
        "host_s": statistics.median(host_times), "tok_s_per_gpu": tok_s,
        "loss_last": losses[-1], "ce_last": ces[-1], "losses": losses,
        **flops.throughput_metrics(config, job.seq_len, tok_s),
        "flops_per_token": flops.flops_per_token(config, job.seq_len),
    })
    result["notes"] += options.notes
    if spec.profile:
        result["profile"] = _profile_step(spec, model, optimizer, batches[-1], options, device)


def _one_step(spec, model, optimizer, ids, options):
    """One optimizer step; returns (loss, cross-entropy, host clock when all its work was queued)."""
    from trainer.perf import causal_lm_loss

    if spec.side == "native":
        loss, aux = _native_step(model, ids)
        coef = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
        ce = loss - (coef * aux.detach() if aux is not None else 0.0)
    else:
        step = causal_lm_loss(model, ids, ids, options)
        step.loss.backward()
        loss, ce = step.loss.detach(), step.ce
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    queued = time.perf_counter()
    return loss.item(), float(ce), queued


def _profile_step(spec, model, optimizer, ids, options, device) -> str:
    """One extra step under torch.profiler: the top kernels by device time (not part of the timing)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        _one_step(spec, model, optimizer, ids, options)
        _sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3
    averages = prof.key_averages()
    sort_key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    # kernels only (an operator's own row repeats its kernels' time)
    kernel_ms = sum(e.self_device_time_total for e in averages
                    if str(getattr(e, "device_type", "")).endswith(("CUDA", "PrivateUse1"))) / 1e3
    cpu_ms = sum(e.self_cpu_time_total for e in averages) / 1e3
    # kernel time below the wall time means the GPU waited (on the host, or on a synchronisation)
    summary = (f"profiled step: wall {wall_ms:.1f} ms, kernel time {kernel_ms:.1f} ms (all streams), "
               f"host {cpu_ms:.1f} ms")
    table = averages.table(sort_by=sort_key, row_limit=30, max_name_column_width=70)
    if device.type == "cuda":
        summary += "\n" + _stream_timeline(prof, spec)
    return summary + "\n" + table


def _stream_timeline(prof, spec: RunSpec) -> str:
    """Busy time per CUDA stream and the compute stream's idle gaps (bench.timeline) from the step's trace; with
    MOE_BENCH_TRACE_DIR set, the trace's kernels and host operators are kept there (gzipped chrome trace)."""
    import tempfile

    from bench.timeline import compact_trace, stream_summary

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    keep = os.environ.get("MOE_BENCH_TRACE_DIR")
    if keep:
        import gzip
        import re

        os.makedirs(keep, exist_ok=True)
        rank = f"-rank{os.environ['RANK']}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{spec.job}-{spec.label}{rank}").strip("_")
        with gzip.open(os.path.join(keep, f"{name}.trace.json.gz"), "wt") as f:
            json.dump(compact_trace(trace), f)
    return stream_summary(trace)


LAYOUTS = {"ep": "expert parallel over all GPUs + FSDP2", "fsdp": "FSDP2 only (every GPU runs all experts)",
            "zero2": "FSDP2 only, parameters kept gathered from forward to backward (reshard_after_forward=False)",
            "replicate": "every GPU holds the whole model; gradients averaged layer by layer inside the backward",
            "replicate-sharded": "as replicate, each GPU updating (and keeping AdamW state for) half of each weight",
            "replicate-ep": "as replicate-sharded, but each GPU keeps only its half of the experts (expert parallel: "
                            "tokens travel to their experts and back)",
            "replicate-ep-allgather": "as replicate-ep, every token sent to every GPU (all-gather / reduce-scatter: "
                                      "static shapes, so the layers keep their CUDA graphs)"}


def _parallelize(model, job, layout: str) -> None:
    """Multi-GPU jobs through trainer.parallel (bf16 weights, bf16 gradient reduction as the native baseline):
    layout "ep" = EP over all GPUs + FSDP2, "fsdp" = FSDP2 only, "zero2" = FSDP2 only without resharding between
    forward and backward (one all-gather per step instead of two, the gathered weights held meanwhile),
    "replicate" = the whole model on every GPU, gradients averaged by the in-backward optimizer
    (trainer.parallel.replicate; the variant needs opt-in-bwd / opt-overlap), "replicate-sharded" = the same with
    the optimizer's state and update split across the GPUs, "replicate-ep" = replicate-sharded with each GPU keeping
    only its share of the experts (trainer.parallel.replicate_experts; MOE_BENCH_DISPATCHER picks the dispatcher),
    "replicate-ep-allgather" = the same with the all-gather dispatcher (trainer.parallel.allgather)."""
    from trainer.parallel import ParallelConfig, parallelize
    from trainer.parallel.replicate import replicate
    from trainer.parallel.replicate_experts import split_experts

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {sorted(LAYOUTS)}")
    dispatcher = os.environ.get("MOE_BENCH_DISPATCHER", "auto")
    if layout.startswith("replicate"):
        replicate(model, shard_optimizer=layout != "replicate")
        if layout.startswith("replicate-ep"):
            split_experts(model, "allgather" if layout == "replicate-ep-allgather" else dispatcher)
        return
    ep_size = job.gpus if layout == "ep" else 1
    parallelize(model, ParallelConfig(ep_size=ep_size, dispatcher=dispatcher, param_dtype=None, reduce_dtype=None,
                                      reshard_after_forward=layout != "zero2"), precision="bf16")


def main_worker(spec_json: str) -> int:
    """Entry used by compare.py's subprocesses: run one spec, print one result line."""
    spec = RunSpec(**json.loads(spec_json))
    dist_ctx = contextlib.nullcontext()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist_ctx = _distributed()
    with dist_ctx:
        result = run(spec)
    if int(os.environ.get("RANK", "0")) == 0:
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


@contextlib.contextmanager
def _distributed():
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield
    finally:
        dist.destroy_process_group()
