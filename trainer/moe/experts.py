"""The fast experts implementation, registered in transformers' `ExpertsInterface` as `moe_fast`.

Any HF v5 experts module decorated with `@use_experts_implementation` (about 60 families) calls
`fast_experts_forward(module, hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]) -> [T, H]`
once the model is built with `experts_implementation="moe_fast"`. It keeps HF's parameters
(`gate_up_proj [E, 2I, H]` or `up_proj [E, I, H]`, `down_proj [E, H, I]`, transposed variants, optional biases)
and runs: dispatch (sort by expert, or all-to-all / DeepEP under expert parallelism) -> grouped GEMM -> activation ->
grouped GEMM -> combine (weighted K-way sum, deterministic).

Option (local path only, no bias): the memory-lean fused expert MLP (`trainer.kernels.fused_expert_mlp`): row
gather, expert MLP on rows, combine, which together save the pre-activation and the down output only (its routing
plan, like the local dispatcher's, needs no host synchronisation). Turn it on per module with
`set_fused_experts(model)` (what `trainer.perf` does), or for every model with the environment variable
MOE_FUSED_EXPERTS=1. The all-to-all and DeepEP dispatchers keep the unfused path; the all-gather dispatcher
(`trainer.parallel.allgather`) runs the fused expert MLP on the EP group's tokens, inside compiled graphs.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from trainer.kernels.fused_expert_mlp import OP_ACTIVATIONS, activation_for, fused_expert_mlp
from trainer.lora.experts import adapters_of, row_lora, with_adapter
from trainer.moe.dispatch import LOCAL_DISPATCHER
from trainer.moe.grouped_gemm import grouped_mm
from trainer.moe.permute import make_plan, permute_tokens, unpermute_and_combine

IMPLEMENTATION_NAME = "moe_fast"
FUSED_ENV = "MOE_FUSED_EXPERTS"


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank-local shard of an expert-parallel DTensor (experts are sharded on dim 0), else the tensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _as_kn(w_E__: torch.Tensor, is_transposed: bool) -> torch.Tensor:
    """HF stores [E, out, in] (or [E, in, out] when transposed); grouped GEMM wants [E, in, out]."""
    return w_E__ if is_transposed else w_E__.transpose(-2, -1)


def _expert_of_row(plan, num_local_experts: int) -> torch.Tensor:
    expert_of_row = getattr(plan, "expert_of_row_S", None)
    if expert_of_row is not None:
        return expert_of_row
    counts = torch.diff(plan.offsets_E.long(), prepend=plan.offsets_E.new_zeros(1).long())
    return torch.repeat_interleave(torch.arange(num_local_experts, device=counts.device), counts)


def expert_mlp(module: torch.nn.Module, x_SD: torch.Tensor, plan) -> torch.Tensor:
    """Run the local experts on rows grouped by expert. [S, H] -> [S, H]. LoRA adapters of the expert weights
    (`trainer.lora.experts`) are added on the same rows, after each frozen grouped GEMM."""
    offsets_E = plan.offsets_E
    has_gate = getattr(module, "has_gate", True)
    has_bias = getattr(module, "has_bias", False)
    is_transposed = getattr(module, "is_transposed", False)
    up_EHF = _as_kn(_local(module.gate_up_proj if has_gate else module.up_proj), is_transposed)
    down_EFH = _as_kn(_local(module.down_proj), is_transposed)
    adapters = adapters_of(module)

    h_SF = with_adapter(adapters, "gate_up_proj" if has_gate else "up_proj", x_SD,
                        grouped_mm(x_SD, up_EHF, offsets_E), offsets_E)
    if has_bias:
        expert_S = _expert_of_row(plan, up_EHF.shape[0])
        h_SF = h_SF + _local(module.gate_up_proj_bias if has_gate else module.up_proj_bias)[expert_S]
    h_SF = module._apply_gate(h_SF) if has_gate else module.act_fn(h_SF)
    y_SD = with_adapter(adapters, "down_proj", h_SF, grouped_mm(h_SF, down_EFH, offsets_E), offsets_E)
    if has_bias:
        y_SD = y_SD + _local(module.down_proj_bias)[expert_S]
    if y_SD.shape[0] == 0:  # no rows here (expert parallelism): still give the weights a (zero) gradient, so every
        y_SD = y_SD + 0 * (up_EHF.sum() + down_EFH.sum())  # rank joins the same FSDP gradient collectives
    return y_SD


def _fused_enabled(module: torch.nn.Module) -> bool:
    flag = getattr(module, "moe_fused_experts", None)
    if flag is None:
        flag = os.environ.get(FUSED_ENV, "0") == "1"
    return bool(flag) and not getattr(module, "has_bias", False)


def set_fused_experts(model: torch.nn.Module, enabled: bool = True, activation_backend: str = "torch") -> int:
    """Turn the fused local expert MLP on or off for every experts module in `model`; returns how many.

    activation_backend: "torch" (explicit formulas) or "liger" (Triton SwiGLU, CUDA only, falls back to torch).
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "gate_up_proj") or (hasattr(module, "up_proj") and hasattr(module, "down_proj")
                                                  and getattr(module, "has_gate", None) is False):
            if getattr(module, "num_experts", None) is None:
                continue
            module.moe_fused_experts = enabled
            module.moe_activation_backend = activation_backend
            module.__dict__.pop("_moe_activation", None)
            if enabled:  # decided here, eagerly, so that a compiled forward only reads it
                _activation(module)
            count += 1
    return count


def _activation(module):
    """The module's expert activation (trainer.kernels.fused_expert_mlp.Activation), chosen once and cached."""
    activation = module.__dict__.get("_moe_activation")
    if activation is None:
        activation = activation_for(module, getattr(module, "moe_activation_backend", "torch"))
        module.__dict__["_moe_activation"] = activation
    return activation


def _fused_local_forward(module, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    activation = _activation(module)
    has_gate = getattr(module, "has_gate", True)
    plan = make_plan(top_k_index, module.num_experts)  # no host synchronisation
    module.moe_last_tokens_per_expert = plan.tokens_per_expert_E.detach()
    out_TD = fused_expert_mlp(
        hidden_states, top_k_weights, _local(module.gate_up_proj if has_gate else module.up_proj),
        _local(module.down_proj), plan, activation,
        is_transposed=getattr(module, "is_transposed", False),
        lora=row_lora(adapters_of(module), "gate_up_proj" if has_gate else "up_proj"),
    )
    return out_TD.to(hidden_states.dtype)


def fast_experts_forward(
    module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """ExpertsInterface entry: [T, H] tokens, [T, K] expert ids and weights -> [T, H].

    Under torch.compile the fused paths with a SwiGLU / relu^2 activation are traced (the local one, and the
    all-gather dispatcher's: routing plan and collectives are plain tensor ops, the expert MLP one custom op, so the
    layer stays one graph); every other path runs eagerly.
    """
    dispatcher = getattr(module, "moe_dispatcher", None)
    if getattr(dispatcher, "gathers_tokens", False):
        if torch.compiler.is_compiling() and not _gathered_traceable(module):
            return _eager_gathered_forward(module, dispatcher, hidden_states, top_k_index, top_k_weights)
        return _gathered_forward(module, dispatcher, hidden_states, top_k_index, top_k_weights)
    fused = dispatcher is None and _fused_enabled(module)
    if fused and (not torch.compiler.is_compiling() or _activation(module).kind in OP_ACTIVATIONS):
        return _fused_local_forward(module, hidden_states, top_k_index, top_k_weights)
    return _eager_experts_forward(module, hidden_states, top_k_index, top_k_weights, fused)


def _gathered_traceable(module) -> bool:
    """The gathered path compiles when its expert MLP is the fused custom op (no bias, SwiGLU / relu^2)."""
    return not getattr(module, "has_bias", False) and _activation(module).kind in OP_ACTIVATIONS


def _gathered_forward(module, dispatcher, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
    """Static-shape expert parallelism (`trainer.parallel.allgather`): this rank's experts on the EP group's tokens,
    the partial outputs summed back home. No host synchronisation."""
    tokens = dispatcher.gather(hidden_states, top_k_index, top_k_weights, module.num_experts)
    plan = _plan_without_elsewhere(make_plan(tokens.local_index_NK, tokens.num_local_experts + 1), tokens.keep_NK)
    module.moe_last_tokens_per_expert = plan.tokens_per_expert_E.detach()
    has_gate = getattr(module, "has_gate", True)
    if getattr(module, "has_bias", False):
        rows_SD = permute_tokens(tokens.x_ND, plan, tokens.keep_NK)
        out_ND = unpermute_and_combine(expert_mlp(module, rows_SD, plan), tokens.weights_NK, plan, tokens.keep_NK)
    else:
        out_ND = fused_expert_mlp(
            tokens.x_ND, tokens.weights_NK, _local(module.gate_up_proj if has_gate else module.up_proj),
            _local(module.down_proj), plan, _activation(module),
            is_transposed=getattr(module, "is_transposed", False), keep_TK=tokens.keep_NK,
            lora=row_lora(adapters_of(module), "gate_up_proj" if has_gate else "up_proj"),
        )
    return dispatcher.scatter(out_ND.to(hidden_states.dtype))


_eager_gathered_forward = torch.compiler.disable(_gathered_forward)


def _plan_without_elsewhere(plan, keep_NK: torch.Tensor):
    """A plan over local experts + one "elsewhere" bucket, cut to the local experts: the elsewhere rows sort last,
    past the last offset, so the grouped GEMMs never compute them (their expert id is clamped to stay indexable).
    Their rows and pairs are read by nobody (masked), so their gather indices point at row / pair 0 instead: the
    gathers then read one cached row for them rather than half of the group's rows from memory."""
    local = plan.offsets_E.shape[0] - 1
    row_here_S = plan.expert_of_row_S < local
    return dataclasses.replace(plan, offsets_E=plan.offsets_E[:local],
                               tokens_per_expert_E=plan.tokens_per_expert_E[:local],
                               expert_of_row_S=plan.expert_of_row_S.clamp(max=local - 1),
                               perm_S=torch.where(row_here_S, plan.perm_S, 0),
                               inv_perm_S=torch.where(keep_NK.reshape(-1), plan.inv_perm_S, 0))


@torch.compiler.disable
def _eager_experts_forward(module, hidden_states, top_k_index, top_k_weights, fused: bool) -> torch.Tensor:
    """Dispatchers (expert parallelism synchronises with the host to size its all-to-all) and the fused Function
    with an arbitrary activation module stay out of compiled graphs."""
    if fused:
        return _fused_local_forward(module, hidden_states, top_k_index, top_k_weights)
    dispatcher = getattr(module, "moe_dispatcher", None) or LOCAL_DISPATCHER
    if getattr(dispatcher, "weights_at_dispatch", False):  # expert-parallel dispatchers weight on the expert side
        rows_SD, plan = dispatcher.dispatch(hidden_states, top_k_index, module.num_experts, top_k_weights)
    else:
        rows_SD, plan = dispatcher.dispatch(hidden_states, top_k_index, module.num_experts)
    module.moe_last_tokens_per_expert = plan.tokens_per_expert_E.detach() if hasattr(plan, "tokens_per_expert_E") else None
    y_SD = expert_mlp(module, rows_SD, plan)
    return dispatcher.combine(y_SD, top_k_weights, plan).to(hidden_states.dtype)


def register_fast_experts() -> str:
    """Register `moe_fast` in transformers' ExpertsInterface (idempotent) and return the name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION_NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, fast_experts_forward)
    return IMPLEMENTATION_NAME
