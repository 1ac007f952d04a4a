"""Where a profiled step's GPU streams wait: busy time per stream and the compute stream's longest idle gaps.

    summary = stream_summary(json.load(open("trace.json")))   # a torch.profiler chrome trace

Kernel time summed over a step says how much work there is; this says when the streams had none. For each stream:
kernels, busy ms (the union of its kernels' intervals) and busy share of the step. For the stream with the most
kernels (the compute stream): idle ms in total and its longest gaps, each with what the host was running at the
gap's middle (the innermost operators, outermost first), which names the launch or synchronisation it waited on.
"""

from __future__ import annotations

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def busy_intervals(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of [start, end) intervals, sorted and merged."""
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def idle_gaps(intervals: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    """The gaps between merged busy intervals inside [start, end)."""
    gaps, cursor = [], start
    for a, b in intervals:
        if a > cursor:
            gaps.append((cursor, min(a, end)))
        cursor = max(cursor, b)
    if cursor < end:
        gaps.append((cursor, end))
    return [(a, b) for a, b in gaps if b > a]


def _host_ops_at(cpu_ops: list[dict], t: float, depth: int = 3) -> str:
    covering = [e for e in cpu_ops if e["ts"] <= t < e["ts"] + e.get("dur", 0)]
    covering.sort(key=lambda e: -e.get("dur", 0))  # outermost first
    names = [e["name"][:40] for e in covering[-depth:]]
    return " > ".join(names) if names else "(no operator: Python between ops)"


def compact_trace(trace: dict) -> dict:
    """The trace's GPU work, host operators and runtime calls only, each with its stream and correlation ids (small
    enough to keep)."""
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    kept = []
    for e in events:
        if e.get("ph") != "X" or e.get("cat") not in GPU_CATEGORIES + ("cpu_op", "cuda_runtime", "python_function"):
            continue
        item = {k: e[k] for k in ("ph", "name", "cat", "ts", "dur", "tid", "pid") if k in e}
        # the stream, and the ids that tie a kernel to its launch and the launch to its host operator
        args = {k: v for k, v in e.get("args", {}).items() if k in ("stream", "correlation", "External id")}
        if args:
            item["args"] = args
        kept.append(item)
    return {"traceEvents": kept}


def stream_summary(trace: dict, top_gaps: int = 6, min_gap_us: float = 20.0) -> str:
    events = trace.get("traceEvents", trace if isinstance(trace, list) else [])
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]
    cpu_ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    if not kernels or not cpu_ops:
        return "timeline: no GPU kernels in the trace"
    step_start = min(e["ts"] for e in cpu_ops)
    step_end = max(e["ts"] + e.get("dur", 0) for e in kernels + cpu_ops)
    wall = step_end - step_start
    streams: dict[object, list[tuple[float, float]]] = {}
    for e in kernels:
        streams.setdefault(e.get("args", {}).get("stream"), []).append((e["ts"], e["ts"] + e.get("dur", 0)))
    lines = [f"timeline: step {wall / 1e3:.1f} ms"]
    for stream, spans in sorted(streams.items(), key=lambda kv: -len(kv[1])):
        busy = sum(b - a for a, b in busy_intervals(spans))
        lines.append(f"  stream {stream}: {len(spans)} kernels, busy {busy / 1e3:.1f} ms ({100 * busy / wall:.0f}%)")
    compute = max(streams, key=lambda s: len(streams[s]))
    gaps = [g for g in idle_gaps(busy_intervals(streams[compute]), step_start, step_end) if g[1] - g[0] >= min_gap_us]
    lines.append(f"  compute stream {compute} idle {sum(b - a for a, b in gaps) / 1e3:.1f} ms in {len(gaps)} gaps "
                 f">= {min_gap_us:.0f} us; longest:")
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top_gaps]:
        lines.append(f"    at {(a - step_start) / 1e3:7.2f} ms, {(b - a) / 1e3:6.2f} ms: "
                     f"{_host_ops_at(cpu_ops, (a + b) / 2)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.timeline RUN_DIR/profile.trace.json.gz ...`: the stream summary of each profiled step."""
    import gzip
    import json
    import sys

    for path in (argv if argv is not None else sys.argv[1:]):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as f:
            print(f"{path}:\n{stream_summary(json.load(f))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
