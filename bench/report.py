"""Render benchmark results (results.json from bench/compare.py) as a text table, markdown and a bar plot.

    python -m bench.report runs/bench/results.json [more.json ...] [--png out.png] [--runs native,ours[best]]

A job run with overrides on both sides (`--set`) is its own job in the table. Repeats of the same (job, label) are
merged: the table shows the median throughput and the maximum peak memory,
with the run-to-run spread (max-min over median) so a difference smaller than the noise is visible as such.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from collections import OrderedDict

from trainer.flops import PEAK_TFLOPS


def environment() -> dict:
    """Versions and hardware, recorded with every result file."""
    env = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpus"] = torch.cuda.device_count()
    except Exception:
        pass
    for name in ("transformers", "triton", "liger_kernel", "torchao"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "installed")
        except Exception:
            env[name] = None
    return env


def job_name(result: dict) -> str:
    """The job as the table names it: with the overrides both sides ran it with (`bench.compare --set`), if any."""
    return f"{result['job']} ({result['job_set']})" if result.get("job_set") else result["job"]


def _groups(results: list[dict]) -> "OrderedDict[tuple, list[dict]]":
    groups: OrderedDict[tuple, list[dict]] = OrderedDict()
    for r in results:
        groups.setdefault((job_name(r), r["label"]), []).append(r)
    return groups


def rows(results: list[dict]) -> list[dict]:
    """One row per (job, label): merged numbers, plus ratios against the job's native row."""
    merged = []
    for (job, label), runs in _groups(results).items():
        ok = [r for r in runs if "tok_s_per_gpu" in r]
        row = {"job": job, "label": label, "runs": len(runs), "ok": len(ok)}
        if not ok:
            failed = next((r for r in runs if r.get("error") or r.get("skipped")), runs[0])
            row["status"] = failed.get("skipped") and f"skipped: {failed['skipped']}" or f"failed: {failed.get('error')}"
            if "peak_gib" in failed:
                row["peak_gib"] = failed["peak_gib"]
            merged.append(row)
            continue
        tok = [r["tok_s_per_gpu"] for r in ok]
        median = statistics.median(tok)
        row.update({
            "tok_s_per_gpu": median,
            "spread": (max(tok) - min(tok)) / median if len(tok) > 1 else 0.0,
            "tflops_per_gpu": statistics.median(r["tflops_per_gpu"] for r in ok),
            "peak_gib": max((r["peak_gib"] for r in ok if "peak_gib" in r), default=None),
            "loss_last": ok[-1]["loss_last"],
            "status": "ok",
        })
        row["mfu"] = row["tflops_per_gpu"] / PEAK_TFLOPS
        merged.append(row)
    natives = {}
    for r in merged:  # the job's fastest native row (several layouts on multi-GPU jobs) is the reference
        if r["label"].startswith("native") and "tok_s_per_gpu" in r:
            if r["job"] not in natives or r["tok_s_per_gpu"] > natives[r["job"]]["tok_s_per_gpu"]:
                natives[r["job"]] = r
    for row in merged:
        native = natives.get(row["job"])
        if native and "tok_s_per_gpu" in row:
            row["speedup"] = row["tok_s_per_gpu"] / native["tok_s_per_gpu"]
            if row.get("peak_gib") and native.get("peak_gib"):
                row["mem_ratio"] = row["peak_gib"] / native["peak_gib"]
    return merged


_COLUMNS = ["job", "run", "tok/s/GPU", "TFLOP/s/GPU", "MFU", "peak GiB", "loss@last", "vs native", "mem vs native"]


def _cells(row: dict) -> list[str]:
    if "tok_s_per_gpu" not in row:
        peak = f"{row['peak_gib']:.1f}" if "peak_gib" in row else "-"
        return [row["job"], row["label"], row["status"][:60], "-", "-", peak, "-", "-", "-"]
    spread = f" ±{row['spread'] * 50:.0f}%" if row.get("spread") else ""
    return [
        row["job"], row["label"], f"{row['tok_s_per_gpu']:,.0f}{spread}", f"{row['tflops_per_gpu']:.0f}",
        f"{row['mfu'] * 100:.1f}%", f"{row['peak_gib']:.1f}" if row.get("peak_gib") else "-", f"{row['loss_last']:.4f}",
        f"{row['speedup']:.2f}x" if "speedup" in row else "-", f"{row['mem_ratio']:.2f}x" if "mem_ratio" in row else "-",
    ]


def summary_table(results: list[dict]) -> str:
    """Fixed-width text table for the terminal."""
    table = [_COLUMNS] + [_cells(r) for r in rows(results)]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(results: list[dict]) -> str:
    """Markdown table (paste into docs/BENCHMARKS.md)."""
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows(results)]
    return "\n".join(lines) + "\n"


def write_plot(results: list[dict], path: str) -> str | None:
    """Bar plot of throughput and peak memory, native vs ours, per job; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    data = [r for r in rows(results) if "tok_s_per_gpu" in r]
    if not data:
        return None
    labels = [f"{r['job']}\n{r['label']}" for r in data]
    colors = ["#888888" if r["label"].startswith("native") else "#2a7ab9" for r in data]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 1.1 * len(data)), 7), sharex=True)
    ax1.bar(range(len(data)), [r["tok_s_per_gpu"] for r in data], color=colors)
    ax1.set_ylabel("tokens/s/GPU")
    ax2.bar(range(len(data)), [r.get("peak_gib") or 0.0 for r in data], color=colors)
    ax2.set_ylabel("peak GiB")
    ax2.set_xticks(range(len(data)))
    ax2.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax1.set_title("native (grey) vs this trainer (blue)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load(paths: list[str]) -> list[dict]:
    results = []
    for path in paths:
        with open(path) as f:
            results += json.load(f)["results"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="results.json files from bench/compare.py")
    parser.add_argument("--png", default=None, help="also write the bar plot here")
    parser.add_argument("--text", action="store_true", help="also print the fixed-width table (printed last)")
    parser.add_argument("--runs", default=None,
                        help="keep only these run labels, comma-separated (e.g. 'native,ours[best]'); default: all")
    args = parser.parse_args(argv)
    results = load([f for f in args.files if _exists(f)])
    if args.runs:
        keep = {label.strip() for label in args.runs.split(",")}
        results = [r for r in results if r.get("label") in keep]
    print(render_markdown(results))
    if args.png:
        print(write_plot(results, args.png) or "no plot (matplotlib missing or no successful run)")
    if args.text:
        print()
        print(summary_table(results))
    return 0


def _exists(path: str) -> bool:
    import os

    if not os.path.exists(path):
        print(f"missing: {path}", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
