"""Global gradient norm and clipping for models whose gradients live on different meshes.

With expert parallelism, expert gradients are DTensors on the (efsdp, ep) mesh and the rest on the dp_shard mesh;
`torch.nn.utils.clip_grad_norm_` stacks per-tensor norms and refuses mixed meshes. Here each mesh group's norm is
reduced on its own mesh, and the squares are summed: the same global L2 norm, on every rank.
"""

from __future__ import annotations

import contextlib

import torch


def _mesh_key(grad: torch.Tensor):
    mesh = getattr(grad, "device_mesh", None)
    return id(mesh) if mesh is not None else None


@torch.no_grad()
def total_grad_norm(parameters) -> torch.Tensor:
    """L2 norm [] of all gradients (a plain tensor, identical on every rank)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(_mesh_key(p.grad), []).append(p.grad)
    if len(groups) == 1:  # one mesh (or none): torch's own norm, unchanged arithmetic
        norm = torch.nn.utils.get_total_norm(next(iter(groups.values())), 2.0, foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    total_sq = None
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        square = norm.float() ** 2
        total_sq = square if total_sq is None else total_sq + square.to(total_sq.device)
    return torch.zeros(()) if total_sq is None else total_sq.sqrt()


class GradNormInBackward:
    """The gradient norm of one process's plain (unsharded) parameters, computed during the backward.

    During the backward of a step's last micro-batch (`arm()` first), each parameter's norm is taken as soon as its
    gradient is final (a post-accumulate-grad hook), on a side CUDA stream under the rest of the backward; `total()`
    then only combines them. The value equals `total_grad_norm` bit for bit: the same per-tensor norms
    (`torch._foreach_norm`), stacked in the order torch's `get_total_norm` groups them, one `vector_norm` over them.
    The gradients stay where they are (this only reads them), so clipping and the non-finite skip work as before.
    """

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self._norms: dict[int, torch.Tensor] = {}
        self._armed = False
        devices = {p.device for p in self.params if p.is_cuda}
        self._stream = torch.cuda.Stream(device=next(iter(devices))) if len(devices) == 1 else None
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_final_grad)

    def arm(self) -> None:
        """The next backward is the step's last: take each norm as its gradient completes."""
        self._norms.clear()
        self._armed = True

    @torch.no_grad()
    def _on_final_grad(self, param: torch.Tensor) -> None:
        if not self._armed or param.grad is None:
            return
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))  # the gradient is written
        with torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext():
            self._norms[id(param)] = torch._foreach_norm([param.grad])[0]

    @torch.no_grad()
    def total(self) -> torch.Tensor:
        """The L2 norm [] of the gradients now present (after the armed backward); norms of gradients that no hook
        saw are taken here."""
        from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

        self._armed = False
        if self._stream is not None:
            torch.cuda.current_stream(self._stream.device).wait_stream(self._stream)
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return torch.zeros(())
        grads = [p.grad for p in with_grad]
        norms = [self._norms.get(id(p)) for p in with_grad]
        missing = [i for i, norm in enumerate(norms) if norm is None]
        for i, norm in zip(missing, torch._foreach_norm([grads[i] for i in missing]) if missing else []):
            norms[i] = norm
        grouped = _group_tensors_by_device_and_dtype([grads], with_indices=True)
        ordered = [norms[i] for _, (_, indices) in grouped.items() for i in indices]
        self._norms.clear()
        first_device = grads[0].device
        return torch.linalg.vector_norm(torch.stack([norm.to(first_device) for norm in ordered]), 2.0)


@torch.no_grad()
def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Global L2 norm [] of all gradients (before clipping); scales them to max_norm when it is > 0 and exceeded.
    Nothing is read back to the host."""
    params = [p for p in model.parameters() if p.grad is not None]
    if len({_mesh_key(p.grad) for p in params}) <= 1:  # one mesh (or none): torch's own, unchanged arithmetic
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    norm = total_grad_norm(params)
    if max_norm > 0:  # on the device, as torch's: no value goes to the host
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        locals_ = [g._local_tensor if hasattr(g, "_local_tensor") else g for g in (p.grad for p in params)]
        for grads in _by_device(locals_).values():
            torch._foreach_mul_(grads, coefficient.to(grads[0].device))
    return norm


def _by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[torch.Tensor]]:
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    return groups
