"""Median CUDA-event time of a GPU function (the kernel micro-benchmarks)."""

from __future__ import annotations

import statistics

import torch


def median_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median over `iters` calls of `fn()`, each timed with CUDA events on the current stream, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
