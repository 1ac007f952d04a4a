"""Benchmark `moe train` against transformers v5 native on the same job, same GPU, one after the other.

    python -m bench.compare --jobs B1-bs4,B1-bs1 --variants "default;overlap" --out runs/bench
    python -m bench.compare --jobs B1-bs4 --variants "default; ac: parallel.activation_checkpointing=attention"
    python -m bench.compare --smoke --out /tmp/bench            # tiny CPU run of the whole pipeline

For each job, `bench/jobs.py` writes one recipe (model config, generated chat data, optimizer, steps). The native row
trains it with transformers' own model and loop (`bench/native.py`); every "ours" row IS `moe train` on that recipe
with the variant's recipe overrides (`bench.jobs.VARIANTS` names the usual ones; any "name: key=value key=value" works),
in a fresh process writing its own run directory. Its tokens/s is the median of the `tokens_per_s` that `moe train`
wrote to metrics.jsonl after the warm-up steps, its peak memory the run's peak there. Prints a table (tok/s/GPU,
TFLOP/s/GPU, MFU vs 989, peak GiB, loss at the last step, speed-up and memory ratio vs native) and writes
results.json (each ours row names its run directory), results.md and results.png.

Each ours run's weight files (`*.safetensors`: a LoRA run's saved random-init base is 57 GiB on B4-lora) are removed
once its numbers are read, so a second variant fits the disk; its recipe, metrics, log and plots stay.
`--keep-weights` keeps them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import signal
import subprocess
import sys
import time

from bench.jobs import JOBS, VARIANTS, resolve, write_job_recipe
from trainer.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_PREFIX = "BENCH_RESULT "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", default="B1-bs4", help=f"comma-separated job names ({', '.join(JOBS)})")
    parser.add_argument("--variants", default="default",
                        help="';'-separated variants of ours: a name from bench/jobs.py VARIANTS "
                             f"({', '.join(VARIANTS)}) or 'name: key=value key=value' (recipe overrides)")
    parser.add_argument("--set", default="", help="recipe overrides for the job itself, both sides (space-separated, "
                                                  "e.g. 'model.attn_implementation=sdpa')")
    parser.add_argument("--steps", type=int, default=20, help="measured steps (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up steps before measuring")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the whole comparison this many times")
    parser.add_argument("--out", default="runs/bench", help="output directory (results.json, results.md, results.png)")
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--ours-only", action="store_true")
    side.add_argument("--native-only", action="store_true")
    parser.add_argument("--native-layouts", default="fsdp",
                        help="multi-GPU jobs: HF native layouts (fsdp = fsdp_size=N; ep = tp_size=N with "
                             "enable_expert_parallel), comma-separated")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run before it is killed")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU job, few steps: checks the pipeline")
    parser.add_argument("--keep-weights", action="store_true",
                        help="ours: keep each run's weight files (removed by default once its numbers are read)")
    parser.add_argument("--profile", action="store_true",
                        help="ours: profile the last step (train.profile_step; profile.txt in the run directory)")


def parse_variants(spec: str) -> list[tuple[str, list[str]]]:
    """'default; overlap; ac: parallel.activation_checkpointing=attention' -> [(name, overrides), ...]."""
    variants = []
    for part in [p.strip() for p in spec.split(";") if p.strip()]:
        name, sep, rest = part.partition(":")
        if sep and "=" not in name:
            overrides = rest.split()
        elif part in VARIANTS:
            name, overrides = part, VARIANTS[part]
        elif "=" in part:
            name, overrides = part.replace(" ", "+"), part.split()
        else:
            raise UserError(f"unknown variant {part!r}",
                            f"use one of {', '.join(VARIANTS)} or 'name: key=value ...' (recipe overrides)")
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise UserError(f"variant {name!r}: {bad[0]!r} is not key=value", "write recipe overrides like perf.compile=off")
        variants.append((name.strip(), overrides))
    return variants


def _python_cmd(gpus: int, module_args: list[str]) -> list[str]:
    if gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"] + module_args
    return [sys.executable] + module_args


def _run(cmd: list[str], timeout: float, log_path: str) -> tuple[int | None, str]:
    """Run `cmd` in its own session (a timeout kills its whole tree); returns (exit code or None on timeout, output)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = None
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if code is None:
        os.killpg(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0] or ""
    with open(log_path, "w") as f:
        f.write(output)
    return code, output


def run_native(job, recipe: str, args, layout: str, out_dir: str) -> dict:
    label = "native" if job.gpus == 1 else f"native[{layout}]"
    payload = json.dumps({"recipe": recipe, "warmup": args.warmup, "steps": args.steps, "layout": layout})
    code, output = _run(_python_cmd(job.gpus, ["-m", "bench.compare", "--native-worker", payload]), args.timeout,
                        os.path.join(out_dir, f"{label}.log"))
    result = {"job": job.name, "label": label, "side": "native"}
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return {**result, **json.loads(line[len(RESULT_PREFIX):])}
    reason = "timeout" if code is None else f"exit {code}"
    return {**result, "error": f"native run ended without a result ({reason})", "log_tail": output[-3000:]}


def run_ours(job, recipe: str, name: str, overrides: list[str], args, out_dir: str, repeat: int) -> dict:
    """`moe train` on the job's recipe with `overrides`; the numbers come from the run's metrics.jsonl."""
    from trainer.metrics import read_metrics

    run_dir = os.path.abspath(os.path.join(out_dir, "runs", f"{name}-{repeat}"))
    extra = [f"train.profile_step={args.warmup + args.steps}"] if getattr(args, "profile", False) else []
    cmd = _python_cmd(job.gpus, ["-m", "trainer.cli", "train", recipe, *overrides, *extra, f"output.dir={run_dir}"])
    started = time.perf_counter()
    code, output = _run(cmd, args.timeout, os.path.join(out_dir, f"ours-{name}-{repeat}.log"))
    result = {"job": job.name, "label": f"ours[{name}]", "side": "ours", "variant": name, "overrides": overrides,
              "run_dir": run_dir, "recipe": os.path.join(run_dir, "recipe.yaml"), "command": " ".join(cmd[1:]),
              "wall_s": time.perf_counter() - started,
              "notes": [line.removeprefix("perf: ") for line in output.splitlines() if line.startswith("perf: ")]}
    records = read_metrics(run_dir) if os.path.isdir(run_dir) else []
    if not getattr(args, "keep_weights", False):
        result["weights_removed_bytes"] = remove_weight_files(run_dir)
    measured = [r for r in records if r["step"] > args.warmup]
    if code != 0 or not measured:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        reason = errors[-1] if errors else ("timeout" if code is None else f"exit {code}")
        return {**result, "error": f"moe train failed ({reason})", "log_tail": output[-3000:]}
    if os.path.exists(os.path.join(run_dir, "profile.txt")):
        result["profile"] = os.path.join(run_dir, "profile.txt")
    world = job.gpus
    tok_s = statistics.median(r["tokens_per_s"] for r in measured) / world
    result.update({
        "tok_s_per_gpu": tok_s, "tflops_per_gpu": statistics.median(r["tflops"] for r in measured) / world,
        "mfu": statistics.median(r["mfu"] for r in measured), "steps_measured": len(measured),
        "peak_gib": max(r["peak_memory_gib"] for r in records), "loss_last": records[-1]["loss"],
        "losses": [r["loss"] for r in records], "step_s": statistics.median(r["step_seconds"] for r in measured),
    })
    return result


def remove_weight_files(run_dir: str) -> int:
    """Delete the `*.safetensors` files under a benchmark's own run directory; returns the bytes freed."""
    freed = 0
    for root, _dirs, files in os.walk(run_dir):
        for name in files:
            if name.endswith(".safetensors"):
                path = os.path.join(root, name)
                freed += os.path.getsize(path)
                os.remove(path)
    return freed


def _check_runnable(job) -> str | None:
    if job.gpus > 1:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() < job.gpus:
            return f"needs {job.gpus} GPUs, found {torch.cuda.device_count()}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--native-worker"]:
        return _native_worker(json.loads(argv[1]))
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    # SIGTERM (a job budget's `timeout`) unwinds like Ctrl-C, so the run in progress is killed with its whole
    # session instead of living on and sharing the GPU with the next run
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run(parser.parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _native_worker(spec: dict) -> int:
    import torch.distributed as dist

    from bench.native import run_native as native

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        result = native(spec["recipe"], spec["warmup"], spec["steps"], spec["layout"])
    finally:
        if distributed:
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def run(args) -> int:
    from bench.report import environment, render_markdown, summary_table, write_plot

    if args.smoke:
        args.jobs = "smoke" if args.jobs in ("", "B1-bs4") else args.jobs
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    try:
        jobs = resolve(args.jobs)
    except ValueError as err:
        raise UserError(str(err), "see --help for the job names") from None
    variants = parse_variants(args.variants)
    os.makedirs(args.out, exist_ok=True)
    results, json_path = [], os.path.join(args.out, "results.json")
    job_set = " ".join(args.set.split())  # the job-level overrides, named in each result (bench.report)
    for repeat in range(args.repeat):
        for job in jobs:
            out_dir = os.path.join(args.out, job.name)
            job_overrides = ([f"parallel.ep_size={job.gpus}"] if job.gpus > 1 else []) + args.set.split()
            recipe = write_job_recipe(job, args.out, args.warmup + args.steps, job_overrides)
            skipped = _check_runnable(job)
            planned = []
            if not args.ours_only:
                layouts = [x for x in args.native_layouts.split(",") if x] if job.gpus > 1 else ["fsdp"]
                planned += [("native", layout) for layout in layouts]
            if not args.native_only:
                planned += [("ours", variant) for variant in variants]
            for side, what in planned:
                if skipped:
                    result = {"job": job.name, "label": side, "side": side, "skipped": skipped}
                elif side == "native":
                    result = run_native(job, recipe, args, what, out_dir)
                else:
                    result = run_ours(job, recipe, what[0], what[1], args, out_dir, repeat)
                result["repeat"] = repeat
                if job_set:
                    result["job_set"] = job_set
                results.append(result)
                print(_one_line(result), flush=True)
                _write_json(json_path, results, args)  # after every run: a later crash keeps what was measured
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(render_markdown(results))
    plot = write_plot(results, os.path.join(args.out, "results.png"))
    print()
    print(summary_table(results))
    print(f"\nwrote {json_path}" + (f", {plot}" if plot else "") + f" ({environment().get('gpu', 'cpu')})")
    return 0


def _write_json(path: str, results: list[dict], args) -> None:
    from bench.report import environment

    payload = {"environment": environment(), "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
               "results": results}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def _one_line(result: dict) -> str:
    head = f"[{result['job']}] {result['label']}:"
    if result.get("skipped"):
        return f"{head} skipped ({result['skipped']})"
    if result.get("error"):
        return f"{head} FAILED {result['error']}" + (f" (peak {result['peak_gib']:.1f} GiB)" if "peak_gib" in result else "")
    peak = f"{result['peak_gib']:.1f} GiB" if result.get("peak_gib") is not None else "n/a"
    where = f" -> {result['run_dir']}" if result.get("run_dir") else ""
    return (f"{head} {result['tok_s_per_gpu']:,.0f} tok/s/GPU, {result['tflops_per_gpu']:.0f} TFLOP/s, "
            f"peak {peak}, loss {result['loss_last']:.4f}{where}")


if __name__ == "__main__":
    sys.exit(main())
