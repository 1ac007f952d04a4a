"""bench.timeline: stream busy time and idle gaps from a chrome trace (events as torch.profiler writes them)."""

from __future__ import annotations

from bench.timeline import busy_intervals, compact_trace, idle_gaps, stream_summary


def _kernel(ts, dur, stream):
    return {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur, "args": {"stream": stream}}


def _op(name, ts, dur):
    return {"ph": "X", "cat": "cpu_op", "name": name, "ts": ts, "dur": dur}


def test_busy_intervals_merge_overlaps_and_gaps_lie_between_them():
    merged = busy_intervals([(5, 8), (0, 2), (1, 3), (8, 9)])
    assert merged == [(0, 3), (5, 9)]
    assert idle_gaps(merged, 0, 12) == [(3, 5), (9, 12)]


def test_summary_names_the_host_operator_during_the_compute_streams_longest_gap():
    trace = {"traceEvents": [
        _op("step", 0, 1000), _op("aten::item", 400, 300), _op("cudaStreamSynchronize", 450, 200),
        _kernel(0, 400, 7), _kernel(700, 300, 7), _kernel(900, 50, 7),
        _kernel(100, 500, 13),  # side stream
    ]}
    text = stream_summary(trace)
    assert "step 1.0 ms" in text
    assert "stream 7: 3 kernels, busy 0.7 ms (70%)" in text
    assert "stream 13: 1 kernels, busy 0.5 ms (50%)" in text
    assert "compute stream 7 idle 0.3 ms in 1 gaps" in text
    assert "step > aten::item > cudaStreamSynchronize" in text


def test_summary_without_kernels_says_so():
    assert "no GPU kernels" in stream_summary({"traceEvents": [_op("step", 0, 10)]})


def test_compact_trace_keeps_gpu_work_and_host_operators_with_their_streams():
    trace = {"traceEvents": [
        _op("aten::mm", 0, 10), {**_kernel(2, 5, 7), "args": {"stream": 7, "correlation": 3, "grid": [1, 1, 1]}},
        {"ph": "X", "cat": "python_function", "name": "f", "ts": 0, "dur": 3, "args": {"Python id": 1}},
        {"ph": "i", "cat": "instant", "name": "marker", "ts": 1},
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep", "ts": 0, "dur": 20},
    ]}
    kept = compact_trace(trace)["traceEvents"]
    assert [e["name"] for e in kept] == ["aten::mm", "k", "f"]
    assert kept[1]["args"] == {"stream": 7, "correlation": 3} and "args" not in kept[2]
    assert stream_summary(compact_trace(trace)) == stream_summary(trace)
