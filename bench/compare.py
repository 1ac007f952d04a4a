"""Benchmark this trainer against transformers v5 native on the same job, same GPU, one after the other.

    python -m bench.compare --jobs B1-bs1,B1-bs4 --variants base,fused-ce,best,best+ac=attn --out runs/bench
    python -m bench.compare --smoke --out /tmp/bench            # tiny CPU run of the whole pipeline

Every run (native, each variant of ours, the recommended fp32-master recipe) is a fresh subprocess, so peak memory
is clean and a crash, OOM or compile failure costs one row, not the comparison. Prints a table
(tok/s/GPU, TFLOP/s/GPU, MFU vs 989, peak GiB, loss at the last step, speed-up and memory ratio vs native) and
writes results.json (+ results.md and results.png via bench/report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict

from bench.jobs import JOBS, resolve
from bench.runner import LAYOUTS, RESULT_PREFIX, RunSpec
from trainer.errors import UserError
from trainer.perf import PerfOptions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VARIANTS = "best"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", default="B1-bs1", help=f"comma-separated job names ({', '.join(JOBS)})")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="comma-separated option sets of ours, each '+'-joined (base, fused-ce, fused-experts, "
                             "liger, compile, compile-attn, fused-adamw, opt-in-bwd, best, ac=full|attn|mlp, ...)")
    parser.add_argument("--recipe", default="best",
                        help="variant for the recommended-recipe row (fp32 master weights); 'none' to skip")
    parser.add_argument("--steps", type=int, default=4, help="measured steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps before measuring")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the whole comparison this many times")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", default="runs/bench", help="output directory (results.json, results.md, results.png)")
    side = parser.add_mutually_exclusive_group()
    side.add_argument("--ours-only", action="store_true")
    side.add_argument("--native-only", action="store_true")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per run before it is killed")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU job, 2 steps: checks the pipeline")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--native-layouts", default="fsdp",
                        help="multi-GPU jobs: HF native layouts to run (fsdp = fsdp_size=N; ep = tp_size=N with "
                             "enable_expert_parallel), comma-separated")
    parser.add_argument("--ours-layouts", default="ep",
                        help="multi-GPU jobs: layouts of ours to run (ep = expert parallel over all GPUs + FSDP2; "
                             "fsdp = FSDP2 only; zero2 = FSDP2 only, weights kept gathered from forward to backward), comma-separated")
    parser.add_argument("--in-process", action="store_true",
                        help="run everything in this process (faster start; no isolation between runs)")
    parser.add_argument("--profile", action="store_true",
                        help="after measuring, profile one extra step of each run and keep the top kernels")


def plan_runs(args) -> list[RunSpec]:
    """The ordered list of runs: per repeat, per job: native, then each variant, then the recipe row."""
    jobs = [JOBS["smoke"]] if args.smoke and args.jobs in ("", "B1-bs1") else resolve(args.jobs)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    common = dict(steps=args.steps, warmup=args.warmup, lr=args.lr, device=args.device,
                  profile=bool(getattr(args, "profile", False)))
    runs = []
    for repeat in range(args.repeat):
        for job in jobs:
            if not args.ours_only and job.gpus == 1:
                runs.append(RunSpec(job.name, "native", repeat=repeat, **common))
            elif not args.ours_only:  # HF's own distributed layouts (protocol): FSDP2, and EP on the tp dimension
                for layout in [x for x in args.native_layouts.split(",") if x]:
                    runs.append(RunSpec(job.name, "native", layout, repeat=repeat, **common))
            if not args.native_only:
                layouts = [x for x in args.ours_layouts.split(",") if x] if job.gpus > 1 else ["ep"]
                for layout in layouts:
                    if layout not in LAYOUTS:
                        raise ValueError(f"unknown --ours-layouts entry {layout!r}: use one of {', '.join(LAYOUTS)}")
                    for variant in variants:
                        runs.append(RunSpec(job.name, "ours", variant, repeat=repeat, layout=layout, **common))
                if args.recipe != "none" and job.gpus == 1:
                    runs.append(RunSpec(job.name, "ours", args.recipe, "master-fp32", repeat=repeat, **common))
    return runs


def _launch(spec: RunSpec, timeout: float) -> dict:
    """Run one spec in a fresh process (torchrun for multi-GPU jobs); parse its result line."""
    job = JOBS[spec.job]
    worker = ["-m", "bench.compare", "--worker", json.dumps(asdict(spec))]
    if job.gpus > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={job.gpus}"] + worker
    else:
        cmd = [sys.executable] + worker
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    started = time.perf_counter()
    # own session: on timeout (or if this process is stopped) the whole worker tree dies, so no orphan keeps the GPU
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        output = proc.communicate()[0] or ""
        return {"spec": asdict(spec), "label": spec.label, "job": spec.job, "side": spec.side,
                "error": f"timeout after {timeout:.0f}s", "log_tail": output[-3000:]}
    except BaseException:
        _kill_tree(proc)
        raise
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            result["wall_s"] = time.perf_counter() - started
            return result
    return {"spec": asdict(spec), "label": spec.label, "job": spec.job, "side": spec.side,
            "error": f"worker exited {code} without a result", "log_tail": output[-3000:]}


def _kill_tree(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _stop_on_sigterm() -> None:
    """`timeout` sends SIGTERM: turn it into an exception so the running worker's process group is killed."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
        pass


def _skip_reason(spec: RunSpec) -> str | None:
    job = JOBS[spec.job]
    if job.gpus > 1 and spec.device != "cpu":
        try:
            import torch

            if torch.cuda.device_count() < job.gpus:
                return f"needs {job.gpus} GPUs, found {torch.cuda.device_count()}"
        except Exception:
            return "torch not importable"
    if job.gpus > 1:
        import importlib.util

        if importlib.util.find_spec("trainer.parallel.config") is None:
            return "trainer.parallel is not available in this checkout"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        from bench.runner import main_worker

        return main_worker(argv[1])
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def run(args) -> int:
    from bench.report import environment, render_markdown, summary_table, write_plot

    if args.smoke:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.device = "cpu" if args.device == "auto" else args.device
        args.timeout = max(args.timeout, 600)
    try:
        runs = plan_runs(args)
        for variant in {r.variant for r in runs if r.side == "ours"}:  # fail before anything runs
            PerfOptions.parse(variant)
    except ValueError as err:
        raise UserError(str(err), "see --help for job names and variant options") from None
    os.makedirs(args.out, exist_ok=True)
    if not args.in_process:
        _stop_on_sigterm()
    print(f"{len(runs)} runs: " + ", ".join(f"{r.job}:{r.label}" for r in runs), flush=True)
    results, json_path = [], os.path.join(args.out, "results.json")
    for spec in runs:
        reason = _skip_reason(spec)
        if reason:
            result = {"spec": asdict(spec), "label": spec.label, "job": spec.job, "side": spec.side,
                      "skipped": reason}
        elif args.in_process:
            from bench.runner import run as run_here

            result = run_here(spec)
        else:
            result = _launch(spec, args.timeout)
        results.append(result)
        print(_one_line(result), flush=True)
        if result.get("profile"):
            print(result["profile"], flush=True)
        _write_json(json_path, results, args)  # after every run: a later crash keeps what was measured
    table = summary_table(results)
    md = render_markdown(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md)
    plot = write_plot(results, os.path.join(args.out, "results.png"))
    print()
    print(table)
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
    peak = f"{result['peak_gib']:.1f} GiB" if "peak_gib" in result else "n/a"
    notes = "; ".join(result.get("notes", []))
    return (f"{head} {result['tok_s_per_gpu']:,.0f} tok/s/GPU, {result['tflops_per_gpu']:.0f} TFLOP/s, peak {peak}, "
            f"loss {result['loss_last']:.4f}, init {result.get('init_s', 0):.0f}s"
            + (f", step {1e3 * result['step_s']:.1f} ms (host queued it in {1e3 * result['host_s']:.1f})"
               if "host_s" in result else "") + (f" [{notes}]" if notes else ""))


if __name__ == "__main__":
    sys.exit(main())
