"""The tests' perf options: keys of the recipe's `perf` section as overrides, resolved for a device as a recipe's are.

    options = perf_options("fused_ce=on", "optimizer=overlap")                    # resolved for the CPU
    options = perf_options("compile=layers-graphs", "adamw=auto", device="cuda")  # auto settled for CUDA

The overrides start from the plain step (`PLAIN`: every option off, torch's kernels, default stream priorities), so
a test names each option it exercises and a change to what `auto` picks does not change what it tests. Keys and
values are checked by the recipe's own schema (`trainer.config`): a typo is a UserError naming the closest key.
"""

from __future__ import annotations

import torch

from trainer.config import PerfConfig, from_dict
from trainer.perf import PerfOptions, resolve_perf

PLAIN = {"fused_ce": "off", "fused_experts": "off", "kernels": "torch", "compile": "off",
         "optimizer": "after-backward", "adamw": "torch", "defer": "none", "grad_norm": "after-backward",
         "graph_priority": "default",
         "step_priority": "default", "prefetch": "off"}


def perf_config(*overrides: str) -> PerfConfig:
    """`PLAIN` with `key=value` overrides applied in order (`perf.` in front of the key is optional)."""
    values = dict(PLAIN)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"perf override {override!r} is not key=value")
        values[key.strip().removeprefix("perf.")] = value.strip()
    return from_dict({"perf": values}).perf


def perf_options(*overrides: str, device: str | torch.device = "cpu", world_size: int = 1) -> PerfOptions:
    """`perf_config(*overrides)` resolved by `trainer.perf.resolve_perf` for `device` and `world_size`."""
    return resolve_perf(perf_config(*overrides), torch.device(device), world_size)
