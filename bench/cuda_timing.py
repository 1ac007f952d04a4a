"""Median CUDA-event time of a GPU function (the kernel micro-benchmarks)."""

from __future__ import annotations

import statistics

import torch


def median_ms(fn, iters: int, warmup: int = 3, before=None) -> float:
    """Median over `iters` calls of `fn()`, each timed with CUDA events on the current stream, after `warmup` calls.
    `before()` runs ahead of each timed call, untimed (e.g. a barrier, so that ranks start together)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if before is not None:
            before()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()  # also work the call left on other streams
        times.append(start.elapsed_time(end))
    return statistics.median(times)
