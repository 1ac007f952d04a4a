"""Global gradient norm and clipping for models whose gradients live on different meshes.

With expert parallelism, expert gradients are DTensors on the (efsdp, ep) mesh and the rest on the dp_shard mesh;
`torch.nn.utils.clip_grad_norm_` stacks per-tensor norms and refuses mixed meshes. Here each mesh group's norm is
reduced on its own mesh, and the squares are summed: the same global L2 norm, on every rank.
"""

from __future__ import annotations

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
