"""Capability checks for the optional compute backends: one function per backend, each `() -> (available, detail)`.

Every optional heavy dependency (DeepEP, TransformerEngine, mamba-ssm / causal-conv1d, Liger, flash-attn) is probed
here and nowhere else, so the rest of the trainer asks one question (`deepep_available()`) and gets one line back
that says what is there, or what is missing and what falls back. `moe doctor` prints the table; the container
entrypoint uses `installed_backends()` to fail loudly when an image lacks a backend it was built to have.

"available" means usable in this process right now (imported, and a device it needs is present). A backend can be
installed but unavailable (e.g. DeepEP in the GPU image started on a CPU host); `is_installed` tells the two apart.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable

Check = tuple[bool, str]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import(module: str) -> tuple[object | None, str]:
    """Import `module`; return (module, "") or (None, one-line reason)."""
    try:
        return importlib.import_module(module), ""
    except Exception as err:  # noqa: BLE001 - a broken optional install must not crash the caller
        first_line = (str(err).splitlines() or [type(err).__name__])[0]
        return None, f"{type(err).__name__}: {first_line}"


def _cuda_device_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _probe(package: str, module: str, fallback: str, needs_cuda: bool = True) -> tuple[object | None, Check]:
    """Find, (optionally) check for a CUDA device, and import `module` of `package`.

    Returns (module, (True, "")) when usable, else (None, (False, one line: what is missing; what falls back)).
    """
    if importlib.util.find_spec(package) is None:
        return None, (False, f"{package} not installed; {fallback}")
    if needs_cuda and not _cuda_device_present():
        return None, (False, f"{package} installed but no CUDA device; {fallback}")
    imported, reason = _import(module)
    if imported is None:
        return None, (False, f"{module} fails to import ({reason}); {fallback}")
    return imported, (True, "")


@functools.lru_cache(maxsize=None)
def torch_cuda_available() -> Check:
    """torch with a usable CUDA device; detail names torch, CUDA runtime and the device."""
    import torch

    cuda = torch.version.cuda or "none"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} (CUDA build {cuda}); no CUDA device visible, running on CPU"
    name = torch.cuda.get_device_name(0)
    major, minor = torch.cuda.get_device_capability(0)
    count = torch.cuda.device_count()
    return True, f"torch {torch.__version__}, CUDA {cuda}, {count}x {name} (sm{major}{minor})"


@functools.lru_cache(maxsize=None)
def grouped_mm_available(device: str = "cuda") -> Check:
    """Whether torch's grouped GEMM (`F.grouped_mm` from 2.10, `torch._grouped_mm` from 2.7) runs on `device`.

    Runs one tiny bf16 grouped GEMM ([32, 16] x [2, 16, 16] -> [32, 16]) rather than reading version tables:
    up to torch 2.8 the kernel is Hopper-only, later releases add other GPUs and CPU.
    """
    import torch

    fn = getattr(torch.nn.functional, "grouped_mm", None)
    name = "torch.nn.functional.grouped_mm"
    if fn is None:
        fn, name = getattr(torch, "_grouped_mm", None), "torch._grouped_mm"
    if fn is None:
        return False, f"torch {torch.__version__} has no grouped_mm; experts fall back to a loop of matmuls"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        return False, f"{name} present but no CUDA device; experts fall back to a loop of matmuls"
    try:
        x_TD = torch.randn(32, 16, dtype=torch.bfloat16, device=device)
        w_EDF = torch.randn(2, 16, 16, dtype=torch.bfloat16, device=device)
        offsets_E = torch.tensor([16, 32], dtype=torch.int32, device=device)
        fn(x_TD, w_EDF, offs=offsets_E)
    except Exception as err:  # noqa: BLE001 - unsupported device/arch raises various errors
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        return False, f"{name} does not run on {device} ({reason}); experts fall back to a loop of matmuls"
    return True, f"{name} on {device}"


@functools.lru_cache(maxsize=None)
def deepep_available() -> Check:
    """DeepEP v1 (`deep_ep.Buffer`) importable and a CUDA device present; else EP uses all-to-all."""
    module, failure = _probe("deep_ep", "deep_ep", "expert parallelism uses torch all-to-all")
    if module is None:
        return failure
    if not hasattr(module, "Buffer"):
        return False, "deep_ep has no v1 Buffer API (EPv2?); expert parallelism uses torch all-to-all"
    nvshmem = _version("nvidia-nvshmem-cu12") or _version("nvidia-nvshmem-cu13")
    scope = f"internode via NVSHMEM {nvshmem}" if nvshmem else "intranode only (no NVSHMEM)"
    return True, f"deep_ep {_version('deep_ep') or _version('deep-ep') or '?'}, {scope}"


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> Check:
    """TransformerEngine's PyTorch extension importable (needs a CUDA device to initialise)."""
    module, failure = _probe("transformer_engine", "transformer_engine.pytorch", "FP8 paths disabled")
    if module is None:
        return failure
    version = _version("transformer_engine") or _version("transformer-engine") or "?"
    return True, f"transformer_engine {version}"


@functools.lru_cache(maxsize=None)
def mamba_kernels_available() -> Check:
    """mamba-ssm's fused SSD scan and causal-conv1d's CUDA kernel, as Nemotron-H's fast path loads them.

    Asks `trainer.kernels.mamba`, the one module that imports them (it bypasses mamba_ssm's package __init__, which
    needs the CUDA Mamba1 extension that a Triton-only mamba-ssm build does not have).
    """
    from trainer.kernels import mamba

    available, detail = mamba.status()
    if available and not _cuda_device_present():
        return False, f"{detail}; no CUDA device: Nemotron-H uses the pure-torch scan"
    return available, detail


@functools.lru_cache(maxsize=None)
def liger_available() -> Check:
    """Liger kernels (RMSNorm, SwiGLU; fused linear cross-entropy on request) importable."""
    module, failure = _probe("liger_kernel", "liger_kernel.transformers", "RMSNorm and SwiGLU run in torch",
                             needs_cuda=False)
    if module is None:
        return failure
    return True, f"liger_kernel {_version('liger_kernel') or _version('liger-kernel')}"


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> Check:
    """flash-attn importable (optional; transformers' sdpa is the default attention)."""
    module, failure = _probe("flash_attn", "flash_attn", "attention uses sdpa")
    if module is None:
        return failure
    return True, f"flash_attn {getattr(module, '__version__', '?')}"


@functools.lru_cache(maxsize=None)
def nccl_available() -> Check:
    """NCCL process groups available (torch built with NCCL and a CUDA device); else gloo."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        return False, "torch built without NCCL; distributed runs use gloo (CPU)"
    if not torch.cuda.is_available():
        return False, "NCCL built in but no CUDA device; distributed runs use gloo (CPU)"
    major, minor, patch = torch.cuda.nccl.version()
    return True, f"NCCL {major}.{minor}.{patch}"


# name -> (check, modules whose presence means "installed"). Names are what MOE_EXPECT_BACKENDS lists.
BACKENDS: dict[str, tuple[Callable[[], Check], tuple[str, ...]]] = {
    "torch": (torch_cuda_available, ("torch",)),
    "grouped_mm": (lambda: grouped_mm_available("cuda" if _cuda_device_present() else "cpu"), ("torch",)),
    "nccl": (nccl_available, ("torch",)),
    "deepep": (deepep_available, ("deep_ep",)),
    "te": (transformer_engine_available, ("transformer_engine",)),
    "mamba": (mamba_kernels_available, ("mamba_ssm", "causal_conv1d")),
    "liger": (liger_available, ("liger_kernel",)),
    "flash_attn": (flash_attn_available, ("flash_attn",)),
}


def is_installed(name: str) -> bool:
    """Whether the packages behind backend `name` are installed (importable or not)."""
    _, modules = BACKENDS[name]
    return all(importlib.util.find_spec(m) is not None for m in modules)


def check(name: str) -> Check:
    """Run the check for backend `name` (a key of BACKENDS)."""
    fn, _ = BACKENDS[name]
    return fn()
