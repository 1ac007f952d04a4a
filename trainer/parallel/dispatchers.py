"""Pick the expert-parallel dispatcher: `parallel.dispatcher: auto | alltoall | allgather | deepep`.

`allgather` (`trainer.parallel.allgather`) sends every token to every rank of the EP group and needs no host
synchronisation, so the layers compile whole and take CUDA graphs; it is asked for by name (it suits small EP
groups, where nearly every token has an expert on every rank).

`auto` takes DeepEP only where it can run: the `deep_ep` package imports, the devices are CUDA GPUs connected by
NVLink, and, when the EP group spans more than one node, NVSHMEM (with RDMA/IBGDA) is present; otherwise the
all-to-all dispatcher, which runs everywhere (NCCL or gloo). Every rank decides locally and the group agrees on the
weakest answer (one all-reduce), so all ranks always run the same dispatcher. The choice and its reason are logged
once per process.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os

import torch
import torch.distributed as dist

from trainer.errors import UserError
from trainer.parallel.alltoall import AllToAllDispatcher

logger = logging.getLogger("trainer.parallel")
_announced: set[str] = set()

DEEPEP_INSTALL_HINT = (
    "build DeepEP v1.2.1 from source on a CUDA machine (bench/device/build_deepep.sh: TORCH_CUDA_ARCH_LIST=9.0, "
    "NVSHMEM from the nvidia-nvshmem wheel, `pip install --no-build-isolation .`), or set parallel.dispatcher=alltoall"
)


def deepep_unavailable_reason(group: dist.ProcessGroup | None, device_type: str) -> str | None:
    """Why DeepEP cannot serve this EP group on this rank, or None when it can."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return "the devices are not CUDA GPUs"
    if importlib.util.find_spec("deep_ep") is None:
        return "the deep_ep package is not installed"
    try:
        importlib.import_module("deep_ep")
    except Exception as err:  # a broken build fails here (missing libnvshmem, ABI mismatch, ...)
        return f"deep_ep does not import ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    if not _local_gpus_nvlinked():
        return "the GPUs of this node are not all connected by NVLink (DeepEP's intranode kernels need NVLink)"
    ep_size = dist.get_world_size(group) if group is not None else 1
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
    if ep_size > local_world:
        if importlib.util.find_spec("nvidia.nvshmem") is None and not os.environ.get("NVSHMEM_DIR"):
            return f"the EP group ({ep_size} ranks) spans nodes and NVSHMEM is not installed"
        if not (os.path.isdir("/sys/class/infiniband") and os.listdir("/sys/class/infiniband")):
            return f"the EP group ({ep_size} ranks) spans nodes and this node has no RDMA (InfiniBand/RoCE) device"
    return None


def _local_gpus_nvlinked() -> bool:
    """All visible GPUs pairwise connected by NVLink (NVML); True when NVML cannot tell and the GPU is an SXM part."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = torch.cuda.device_count()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        physical = [int(d) for d in visible.split(",") if d.strip().isdigit()] if visible else list(range(count))
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in physical[:count]]
        for i, a in enumerate(handles):
            for b in handles[i + 1 :]:
                status = pynvml.nvmlDeviceGetP2PStatus(a, b, pynvml.NVML_P2P_CAPS_INDEX_NVLINK)
                if status != pynvml.NVML_P2P_STATUS_OK:
                    return False
        return True
    except Exception:
        return "PCIE" not in torch.cuda.get_device_name().upper()


def _group_agrees(ok: bool, group: dist.ProcessGroup, device_type: str) -> bool:
    flag = torch.tensor([1 if ok else 0], device=device_type if device_type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def make_dispatcher(choice: str, group: dist.ProcessGroup, device_type: str, hidden_size: int | None = None):
    """The dispatcher for `choice`; UserError if `deepep` is asked for and cannot run here."""
    if choice == "alltoall":
        return _announce(AllToAllDispatcher(group), "parallel.dispatcher=alltoall")
    if choice == "allgather":
        from trainer.parallel.allgather import AllGatherDispatcher

        return _announce(AllGatherDispatcher(group), "parallel.dispatcher=allgather")
    reason = deepep_unavailable_reason(group, device_type)
    if choice == "deepep" and reason is not None:  # raise before any collective: no rank waits on this one
        raise UserError(f"parallel.dispatcher=deepep but DeepEP cannot run here: {reason}", DEEPEP_INSTALL_HINT)
    agreed = _group_agrees(reason is None, group, device_type)
    if choice == "deepep":
        if not agreed:
            raise UserError("parallel.dispatcher=deepep but DeepEP cannot run on another rank of the EP group",
                            DEEPEP_INSTALL_HINT)
        from trainer.parallel.deepep import DeepEPDispatcher

        return _announce(DeepEPDispatcher(group, hidden_size), "parallel.dispatcher=deepep")
    if agreed:
        from trainer.parallel.deepep import DeepEPDispatcher

        return _announce(DeepEPDispatcher(group, hidden_size), "auto: deep_ep imports and the GPUs are NVLink-connected")
    return _announce(AllToAllDispatcher(group), f"auto: {reason or 'DeepEP cannot run on another rank'}")


def _announce(dispatcher, reason: str):
    key = f"{dispatcher.name}:{reason}"
    if key not in _announced:
        _announced.add(key)
        message = f"expert-parallel dispatcher: {dispatcher.name} ({reason})"
        logger.info(message)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(message, flush=True)
    return dispatcher
