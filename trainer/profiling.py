"""One optimizer step under torch.profiler (`train.profile_step`): where the step's device time goes.

    with StepProfiler(run_dir, step=20) as prof:   # profiles only when the step numbers match
        ...

Writes `profile.txt` into the run directory: the step's wall time, its total kernel time (all streams; below the
wall time means the GPU waited) and the top operators and kernels by device time (by host time on the CPU), plus
`profile.trace.json.gz`, a Chrome trace (chrome://tracing or Perfetto) of that step.
"""

from __future__ import annotations

import gzip
import shutil
import time
from pathlib import Path

import torch


class StepProfiler:
    """Context manager around one step; a no-op unless `active`. `done()` must be called once the step's work is
    finished (after reading its values), so the trace holds all of it."""

    def __init__(self, run_dir: Path, active: bool):
        self.run_dir, self.active = Path(run_dir), active
        self._prof, self._started = None, 0.0

    def __enter__(self) -> StepProfiler:
        if self.active:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=activities)
            self._prof.__enter__()
            self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - self._started) * 1e3
        self._prof.__exit__(*exc)
        if exc[0] is None:
            self._write(wall_ms)

    def _write(self, wall_ms: float) -> None:
        averages = self._prof.key_averages()
        cuda = torch.cuda.is_available()
        kernel_ms = sum(getattr(e, "self_device_time_total", 0) for e in averages
                        if str(getattr(e, "device_type", "")).endswith("CUDA")) / 1e3
        table = averages.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40,
                               max_name_column_width=80)
        summary = f"profiled step: wall {wall_ms:.1f} ms" + (f", kernel time {kernel_ms:.1f} ms (all streams)"
                                                            if cuda else "")
        (self.run_dir / "profile.txt").write_text(summary + "\n" + table + "\n")
        trace = self.run_dir / "profile.trace.json"
        self._prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
