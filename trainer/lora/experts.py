"""The adapter of the routed experts, computed on the permuted rows of the grouped expert MLP.

PEFT (`target_parameters`) adapts a fused expert parameter W [E, out, in] (HF layout; [E, in, out] when
`is_transposed`) with two linear weights: A [E*r, in] (expert-major rows: expert e owns rows e*r:(e+1)*r) and
B [out, r*E] (rank-major columns: column j*E + e is rank j of expert e), and computes the dense W + scaling * B_e A_e
for every expert on every forward. Here the same adapter runs on the rows that reach each expert instead:

    y_S = rows_S @ W_e^T + scaling * (rows_S @ A_e^T) @ B_e^T          e = expert of row S

as two grouped GEMMs ([S, in] x [E, in, r] -> [S, r], then [S, r] x [E, r, out] -> [S, out]) next to the frozen
one: O(S * r * (in + out)) work instead of O(E * in * out), and no [E, out, in] delta ever exists. Autograd gives
dA and dB through the grouped GEMMs (`trainer.moe.grouped_gemm`); the frozen W gets no weight gradient at all.
The memory-lean fused expert MLP (`trainer.kernels.fused_expert_mlp`, `perf.fused_experts`) takes the same factors
(`row_lora`) and computes the same terms with an explicit backward.

Under expert parallelism (`parallel.ep_size > 1`) the experts module holds experts [lo, hi) of this EP rank (its
[E, ...] weights are DTensors `Shard(0)` over "ep"), and the rows it receives are grouped by those local experts.
The factors are then the local experts' slices of PEFT's A and B: A's rows lo*r:hi*r, and B's columns j*E + e for
e in [lo, hi) (strided: PEFT's B is rank-major). The adapter weights themselves stay whole, in PEFT's layout, and
are FSDP-sharded with the dense weights of their decoder layer over every data-parallel rank: each rank gathers the
layer's adapters, uses its experts' slice, and gets zero gradient on the other experts' entries, so the
reduce-scatter (a sum over all ranks, divided by their number) gives each expert's gradient once, summed over every
rank's tokens, exactly as for the expert weights (`trainer.parallel.apply`). Checkpoints and the export need no
conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.kernels.fused_expert_mlp import NO_LORA, RowLora
from trainer.moe.grouped_gemm import grouped_mm

ADAPTER = "default"  # PEFT's name for the one adapter a model trains


def local_experts(param: torch.Tensor) -> tuple[int, int]:
    """[lo, hi): the experts of a stacked [E, ...] expert weight this rank computes, read inside the forward (where
    FSDP2 has gathered its own shards: what remains a DTensor is the expert-parallel split, `Shard(0)` over "ep");
    all of them for a plain tensor."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return 0, param.shape[0]
    local = param.to_local().shape[0]
    lo = mesh.get_local_rank() * local
    return lo, lo + local


@dataclass
class ExpertAdapter:
    """One fused expert parameter's adapter: the PEFT `ParamWrapper` that holds lora_A / lora_B."""

    wrapper: torch.nn.Module

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A_EIr [E_local, in, r], B_ERO [E_local, r, out], scaling) in grouped-GEMM layout for the experts this
        rank computes (`local_experts`): slices of PEFT's weights, made contiguous (E*r*(in + out) elements at
        most, small next to the experts)."""
        w = self.wrapper
        num_experts = w.num_experts
        lo, hi = local_experts(w.get_param())
        a_w = w.lora_A[ADAPTER].weight  # [E*r, in]
        b_w = w.lora_B[ADAPTER].weight  # [out, r*E]
        a_EIr = a_w.view(num_experts, -1, a_w.shape[-1])[lo:hi].transpose(1, 2).contiguous()
        b_ERO = b_w.view(b_w.shape[0], -1, num_experts)[:, :, lo:hi].permute(2, 1, 0).contiguous()
        return a_EIr, b_ERO, float(w.scaling[ADAPTER])

    def delta_rows(self, rows_SI: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
        """scaling * (rows @ A_e^T) @ B_e^T for rows grouped by expert: [S, in] -> [S, out]."""
        a_EIr, b_ERO, scaling = self.factors()
        low_Sr = grouped_mm(rows_SI, a_EIr.to(rows_SI.dtype), offsets_E)
        return grouped_mm(low_Sr, b_ERO.to(low_Sr.dtype), offsets_E) * scaling


def adapters_of(module: torch.nn.Module) -> dict[str, ExpertAdapter] | None:
    """{parameter name: adapter} of an experts module switched to the row path (`attach`), or None."""
    return module.__dict__.get("moe_lora_adapters")


def attach(experts: torch.nn.Module, wrappers: list[torch.nn.Module]) -> None:
    """Record the PEFT wrappers of `experts` on it, so the moe_fast forward adds their adapters on the rows."""
    experts.__dict__["moe_lora_adapters"] = {w.parameter_name: ExpertAdapter(w) for w in wrappers}


def with_adapter(adapters: dict[str, ExpertAdapter] | None, name: str, rows: torch.Tensor, out: torch.Tensor,
                 offsets_E: torch.Tensor) -> torch.Tensor:
    """`out` (the frozen grouped GEMM of `rows`) plus the adapter of parameter `name`, if it has one."""
    adapter = adapters.get(name) if adapters else None
    return out if adapter is None else out + adapter.delta_rows(rows, offsets_E).to(out.dtype)


def row_lora(adapters: dict[str, ExpertAdapter] | None, up_name: str) -> RowLora:
    """The adapters as the fused expert MLP takes them (`trainer.kernels.fused_expert_mlp.RowLora`)."""
    if not adapters:
        return NO_LORA
    up, down = adapters.get(up_name), adapters.get("down_proj")
    up_a, up_b, up_scale = up.factors() if up is not None else (None, None, 0.0)
    down_a, down_b, down_scale = down.factors() if down is not None else (None, None, 0.0)
    return RowLora(up_a, up_b, up_scale, down_a, down_b, down_scale)
