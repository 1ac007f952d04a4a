"""mamba-ssm's Triton SSD kernels and causal-conv1d's CUDA conv: the one place that imports them.

Nemotron-H's Mamba2 layers are fast only with two optional packages:
- `causal_conv1d` (a CUDA extension; built for sm_90 by bench/device/build_mamba.sh),
- `mamba_ssm`'s Triton SSD kernels (`mamba_ssm/ops/triton/ssd_combined.py`: `mamba_split_conv1d_scan_combined`,
  `mamba_chunk_scan_combined`).
mamba-ssm built with `MAMBA_SKIP_CUDA_BUILD=TRUE` ships the Triton kernels but not the CUDA-only Mamba1 extension
`selective_scan_cuda`, and its package `__init__` imports that extension, so `import mamba_ssm` fails although the
kernels Nemotron-H needs are all there. `load()` therefore imports the Triton modules under a stand-in package
object that has mamba_ssm's `__path__` but never runs its `__init__`. The stand-in stays in `sys.modules`, so
transformers' own detection (`use_kernel_func_from_hub_with_fallback`, which does `import mamba_ssm` and looks up
`ops.triton.ssd_combined...`) finds the same kernels: `expose_to_transformers()` makes the native transformers
model use them too (the "native with kernels" benchmark row).

`status()` answers in one line what is there, or what is missing and what falls back.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
import types
from dataclasses import dataclass
from typing import Callable

FALLBACK = "Mamba2 layers use the PyTorch reference scan (same result, several times slower)"


@dataclass(frozen=True)
class MambaKernels:
    """The kernel entry points Nemotron-H uses (signatures as in mamba-ssm 2.x / causal-conv1d 1.4+)."""

    split_conv1d_scan_combined: Callable  # in_proj output -> conv -> SSD scan -> gated RMSNorm -> out_proj
    chunk_scan_combined: Callable  # SSD scan alone
    causal_conv1d_fn: Callable
    detail: str


def _version(distribution: str) -> str:
    for name in (distribution, distribution.replace("_", "-")):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "?"


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"


def _install_mamba_ssm_without_init() -> types.ModuleType:
    """Put a stand-in `mamba_ssm` package in sys.modules: mamba_ssm's `__path__`, its `__init__` not run."""
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        del sys.modules[name]  # drop what a failed `import mamba_ssm` left half-initialised
    spec = importlib.util.find_spec("mamba_ssm")
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations or [])
    package.__file__ = spec.origin
    package.__package__ = "mamba_ssm"
    package.__version__ = _version("mamba_ssm")
    package.__doc__ = "mamba_ssm without its package __init__ (the CUDA Mamba1 extension is not installed)"
    sys.modules["mamba_ssm"] = package
    return package


def _import_mamba_ssm() -> tuple[types.ModuleType, str]:
    """`import mamba_ssm`, or the stand-in package when only its `__init__` fails. Returns (module, note)."""
    try:
        return importlib.import_module("mamba_ssm"), ""
    except ImportError as err:
        return _install_mamba_ssm_without_init(), f" (package __init__ bypassed: {_first_line(err)})"


@functools.lru_cache(maxsize=None)
def _load() -> tuple[MambaKernels | None, str]:
    missing = [m for m in ("causal_conv1d", "mamba_ssm") if importlib.util.find_spec(m) is None]
    if missing:
        return None, f"{' and '.join(missing)} not installed; {FALLBACK}"
    try:
        import causal_conv1d  # noqa: F401 - must come first: ssd_combined imports it optionally at import time
        from causal_conv1d import causal_conv1d_fn
    except Exception as err:  # noqa: BLE001 - a broken optional build must not crash training
        return None, f"causal_conv1d fails to import ({_first_line(err)}); {FALLBACK}"
    try:
        _, note = _import_mamba_ssm()
        ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    except Exception as err:  # noqa: BLE001
        return None, f"mamba_ssm's Triton SSD kernels fail to import ({_first_line(err)}); {FALLBACK}"
    if getattr(ssd, "causal_conv1d_fwd_function", None) is None:
        return None, f"causal_conv1d {_version('causal_conv1d')} lacks cpp_functions (needs >= 1.4); {FALLBACK}"
    detail = f"mamba_ssm {_version('mamba_ssm')} Triton SSD{note}, causal_conv1d {_version('causal_conv1d')}"
    kernels = MambaKernels(
        split_conv1d_scan_combined=ssd.mamba_split_conv1d_scan_combined,
        chunk_scan_combined=ssd.mamba_chunk_scan_combined,
        causal_conv1d_fn=causal_conv1d_fn,
        detail=detail,
    )
    return kernels, detail


def load() -> MambaKernels | None:
    """The kernels if both packages import (a CUDA device is needed to run them, not to load them), else None."""
    return _load()[0]


def available_on(device) -> bool:
    """Whether the kernel path can run for tensors on `device`."""
    import torch

    return torch.device(device).type == "cuda" and load() is not None


def status() -> tuple[bool, str]:
    """(usable here, one line): what is installed, or what is missing and what falls back."""
    import torch

    kernels, detail = _load()
    if kernels is None:
        return False, detail
    if not torch.cuda.is_available():
        return False, f"{detail} installed but no CUDA device; {FALLBACK}"
    return True, detail


# transformers' NemotronH module-level function -> (hub/package function name, package)
_TRANSFORMERS_FUNCTIONS = {
    "causal_conv1d_fn": ("causal_conv1d_fn", "causal_conv1d"),
    "causal_conv1d_update": ("causal_conv1d_update", "causal_conv1d"),
    "mamba2_split_conv1d_scan_combined": ("mamba_split_conv1d_scan_combined", "mamba_ssm"),
    "mamba2_selective_state_update": ("selective_state_update", "mamba_ssm"),
    "mamba2_chunk_scan": ("mamba_chunk_scan_combined", "mamba_ssm"),
}


def expose_to_transformers() -> bool:
    """Make transformers' own Nemotron-H Mamba2 mixer use the kernels as well. Returns whether it does.

    transformers resolves the kernels when `modeling_nemotron_h` is imported; with the stand-in package in place
    before that import its detection just works. If the module was imported earlier (it then chose the PyTorch
    path), its five module-level functions are wrapped again with transformers' own decorator.
    """
    if load() is None:
        return False
    module = sys.modules.get("transformers.models.nemotron_h.modeling_nemotron_h")
    if module is None:
        return True
    from transformers.integrations.hub_kernels import use_kernel_func_from_hub_with_fallback

    for attr, (func_name, package) in _TRANSFORMERS_FUNCTIONS.items():
        torch_function = inspect.unwrap(getattr(module, attr))
        setattr(module, attr, use_kernel_func_from_hub_with_fallback(func_name, package)(torch_function))
    return True


def reset_for_tests() -> None:
    """Forget the cached probe (tests install stand-in packages)."""
    _load.cache_clear()
