"""The local expert MLP in three differentiable steps that keep about half the activations of the unfused path.

    out_TD = sum_k w_TK[t, k] * down_e(act(up_e(x_TD[t])))     e = expert index_TK[t, k]

1. dispatch (`trainer.moe.permute.permute_tokens`): the tokens' rows in expert order, x_SD = x_TD[token of row];
2. the expert MLP on those rows (`_rows_op`): grouped GEMM up -> activation (SwiGLU or relu^2) -> grouped GEMM down;
3. combine (`trainer.moe.permute.unpermute_and_combine`): the rows back in token order, weighted and summed over the
   K experts of each token.

Saved for backward: the pre-activation [S, 2I] (or [S, I]) and the down-projection output [S, H], plus the routing
plan (int vectors). The input x_TD is saved too, but it is the MoE block's input, which the router keeps alive
anyway, so it costs nothing extra. Recomputed in backward: the row gather of x and the activation (both
bandwidth-cheap next to the GEMMs). The unfused path (autograd through each op) also keeps the gathered rows [S, H],
the activation output [S, I] (twice for SwiGLU) and the gathered combine input [S, H].

Backward uses the three grouped-GEMM forms: dX = dY @ W^T (2D x 3D), and the per-expert weight gradient
dW[e] = dY[rows_e]^T @ X[rows_e] (2D x 2D with offsets), written straight in HF's [E, out, in] layout; the row
gathers' backwards are gathers through the inverse permutation (no scatter, no atomics).
The reference is `trainer.moe.experts.expert_mlp` + `LocalDispatcher` (the unfused path), tested to agree in fp32.

With SwiGLU or relu^2 the expert MLP is a pair of torch custom ops (forward, backward) joined by
`register_autograd`: opaque to torch.compile, so a compiled decoder layer traces around it without a graph break,
while the dispatch and combine steps are traced (Inductor fuses each gather with its multiply; the K-way sums are
the Triton row sums of `trainer.kernels.row_sum` on CUDA). Any other activation module runs as an autograd
Function (eager only).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from trainer.kernels import bounded_rows
from trainer.kernels import relu2 as relu2_kernel
from trainer.moe.grouped_gemm import grouped_mm, grouped_mm_weight_grad
from trainer.moe.permute import RoutingPlan, permute_tokens, token_of_row, unpermute_and_combine


# ---- activations: forward and an explicit backward on the saved pre-activation -------------------------------------

def _swiglu_forward(pre_SF: torch.Tensor) -> torch.Tensor:
    gate, up = pre_SF.chunk(2, dim=-1)
    return F.silu(gate) * up


def _swiglu_backward(pre_SF: torch.Tensor, grad_h_SI: torch.Tensor) -> torch.Tensor:
    gate, up = pre_SF.float().chunk(2, dim=-1)
    grad = grad_h_SI.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_gate = grad * up * sig * (1.0 + gate * (1.0 - sig))
    return torch.cat([grad_gate, grad * silu], dim=-1).to(pre_SF.dtype)


def _relu2_forward(pre_SI: torch.Tensor) -> torch.Tensor:
    return torch.relu(pre_SI).square()


def _relu2_backward(pre_SI: torch.Tensor, grad_h_SI: torch.Tensor) -> torch.Tensor:
    return (2.0 * torch.relu(pre_SI.float()) * grad_h_SI.float()).to(pre_SI.dtype)


@functools.lru_cache(maxsize=None)
def _liger_swiglu():
    """Liger's Triton SwiGLU on the concatenated [gate | up] layout, or None if not importable."""
    try:
        from liger_kernel.ops.swiglu import swiglu_fused_gate_up_backward, swiglu_fused_gate_up_forward
    except Exception:
        return None
    return swiglu_fused_gate_up_forward, swiglu_fused_gate_up_backward


class Activation:
    """How the expert MLP's activation runs: forward(pre) -> h and backward(pre, grad_h) -> grad_pre.

    kind: "swiglu" (silu(gate) * up on [gate | up]), "relu2", or "module" (any `_apply_gate` / `act_fn`,
    backward by autograd on a recomputed forward). backend: "torch" (the formulas below) or "liger" (Triton kernels
    on CUDA: Liger's SwiGLU, `trainer.kernels.relu2` for relu^2; bit-identical to the formulas for relu^2).
    """

    def __init__(self, kind: str, module: torch.nn.Module | None = None, backend: str = "torch"):
        self.kind, self.module, self.backend = kind, module, backend

    def _use_liger(self, pre: torch.Tensor) -> bool:
        return self.backend == "liger" and self.kind == "swiglu" and pre.is_cuda and _liger_swiglu() is not None

    def _use_triton_relu2(self, *tensors: torch.Tensor) -> bool:
        return self.backend == "liger" and self.kind == "relu2" and relu2_kernel.usable(*tensors)

    def _bounded(self, bound, *tensors) -> bool:
        return bound is not None and self.kind in OP_ACTIVATIONS and bounded_rows.usable(bound, *tensors)

    def forward(self, pre: torch.Tensor, bound: torch.Tensor | None = None) -> torch.Tensor:
        """h = act(pre). `bound` (1-element device count): only rows below it are needed (the others may be left
        unwritten: `trainer.kernels.bounded_rows`)."""
        if self._bounded(bound, pre):
            kernel = bounded_rows.swiglu_forward if self.kind == "swiglu" else bounded_rows.relu2_forward
            return kernel(pre, bound)
        if self._use_liger(pre):
            return _liger_swiglu()[0](pre)[1]
        if self.kind == "swiglu":
            return _swiglu_forward(pre)
        if self._use_triton_relu2(pre):
            return relu2_kernel.relu2_forward(pre)
        if self.kind == "relu2":
            return _relu2_forward(pre)
        return self._module_forward(pre)

    def backward(self, pre: torch.Tensor, grad_h: torch.Tensor, in_place: bool = True,
                 bound: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient w.r.t. the pre-activation. With `in_place`, may overwrite `pre` (not needed afterwards); `bound`
        as in `forward`."""
        if self._bounded(bound, pre, grad_h):
            kernel = bounded_rows.swiglu_backward if self.kind == "swiglu" else bounded_rows.relu2_backward
            return kernel(pre, grad_h, bound)
        if self._use_liger(pre):
            return _liger_swiglu()[1](pre, grad_h.contiguous(), in_place)
        if self.kind == "swiglu":
            return _swiglu_backward(pre, grad_h)
        if self._use_triton_relu2(pre, grad_h):
            return relu2_kernel.relu2_backward(pre, grad_h)
        if self.kind == "relu2":
            return _relu2_backward(pre, grad_h)
        with torch.enable_grad():
            pre_leaf = pre.detach().requires_grad_(True)
            h = self._module_forward(pre_leaf)
            (grad_pre,) = torch.autograd.grad(h, pre_leaf, grad_h)
        return grad_pre

    def _module_forward(self, pre: torch.Tensor) -> torch.Tensor:
        module = self.module
        return module._apply_gate(pre) if getattr(module, "has_gate", True) else module.act_fn(pre)


def activation_for(module: torch.nn.Module, backend: str = "torch") -> Activation:
    """The fastest exact Activation for a HF experts module (standard SwiGLU / relu^2 get explicit formulas)."""
    from transformers.integrations.moe import _default_apply_gate

    act_name = type(getattr(module, "act_fn", None)).__name__
    has_gate = getattr(module, "has_gate", True)
    if has_gate:
        apply_gate = getattr(module, "_apply_gate", None)
        is_default_gate = (getattr(apply_gate, "__func__", apply_gate) is _default_apply_gate
                           and getattr(module, "is_concatenated", True))
        if is_default_gate and act_name in ("SiLU", "SiLUActivation"):
            return Activation("swiglu", module, backend)
    elif act_name in ("ReLUSquaredActivation",):
        return Activation("relu2", module, backend)
    return Activation("module", module, backend)


# ---- LoRA adapters of the expert weights, on the same rows (`trainer.lora.experts`) ---------------------------------

class RowLora(NamedTuple):
    """Adapters of the up and down projections in grouped-GEMM layout: a [E, in, r], b [E, r, out] (None: that
    projection has none), each pair adding scale * (rows @ a[e]) @ b[e]. The frozen expert weights then get no weight
    gradient (`weight_grads` false)."""

    up_a: torch.Tensor | None
    up_b: torch.Tensor | None
    up_scale: float
    down_a: torch.Tensor | None
    down_b: torch.Tensor | None
    down_scale: float


NO_LORA = RowLora(None, None, 0.0, None, None, 0.0)


def _low_rank(rows_SK, a_EKr, b_ERN, offsets_E, scale: float) -> torch.Tensor:
    """scale * (rows @ a[e]) @ b[e] for rows grouped by expert: [S, K] -> [S, N]."""
    low_Sr = grouped_mm(rows_SK, a_EKr.to(rows_SK.dtype), offsets_E)
    return grouped_mm(low_Sr, b_ERN.to(rows_SK.dtype), offsets_E) * scale


def _low_rank_backward(rows_SK, grad_SN, a_EKr, b_ERN, offsets_E, scale: float):
    """-> (grad of rows [S, K] through the adapter, grad a [E, K, r], grad b [E, r, N]), the low-rank rows
    recomputed (one [S, K] x [E, K, r] GEMM) rather than saved."""
    dtype = rows_SK.dtype
    a, b = a_EKr.to(dtype), b_ERN.to(dtype)
    num_experts = a.shape[0]
    low_Sr = grouped_mm(rows_SK, a, offsets_E)
    grad_b = grouped_mm_weight_grad(low_Sr, grad_SN, offsets_E, num_experts) * scale
    grad_low_Sr = grouped_mm(grad_SN, b.transpose(-2, -1), offsets_E) * scale
    grad_a = grouped_mm_weight_grad(rows_SK, grad_low_Sr, offsets_E, num_experts)
    grad_rows = grouped_mm(grad_low_Sr, a.transpose(-2, -1), offsets_E)
    return grad_rows, grad_a.to(a_EKr.dtype), grad_b.to(b_ERN.dtype)


# ---- the expert MLP on rows grouped by expert: forward and backward as plain functions ------------------------------

def _forward(x_SD, up_w, down_w, offsets_E, activation: Activation, is_transposed: bool, compute_dtype,
             bounded: bool = False, lora: RowLora = NO_LORA):
    """-> (y_SD, pre_SF): the rows' expert outputs and the pre-activation the backward needs. `bounded`: rows past
    the last offset are never needed (the all-gather dispatcher's), so row-wise work stops there."""
    # grouped GEMM wants [E, in, out]; HF stores [E, out, in] unless is_transposed
    up_EHF = (up_w if is_transposed else up_w.transpose(-2, -1)).to(compute_dtype)
    down_EIH = (down_w if is_transposed else down_w.transpose(-2, -1)).to(compute_dtype)
    x_SD = x_SD.to(compute_dtype)
    pre_SF = grouped_mm(x_SD, up_EHF, offsets_E)
    if lora.up_a is not None:
        pre_SF = pre_SF + _low_rank(x_SD, lora.up_a, lora.up_b, offsets_E, lora.up_scale)
    h_SI = activation.forward(pre_SF, offsets_E[-1:] if bounded else None)
    y_SD = grouped_mm(h_SI, down_EIH, offsets_E)
    if lora.down_a is not None:
        y_SD = y_SD + _low_rank(h_SI, lora.down_a, lora.down_b, offsets_E, lora.down_scale)
    return y_SD, pre_SF


def _backward(grad_y_SD, x_TD, up_w, down_w, perm_S, offsets_E, pre_SF, top_k: int, activation: Activation,
              is_transposed: bool, dtype, in_place: bool, bounded: bool = False, lora: RowLora = NO_LORA,
              weight_grads: bool = True):
    """-> (grad_x_SD, grad_up, grad_down, lora grads (up a, up b, down a, down b; None where absent)). The input rows
    are gathered again from the tokens x_TD (not saved). With `in_place`, pre_SF may be overwritten. Without
    `weight_grads` (frozen experts) grad_up and grad_down are None and their GEMMs are skipped."""
    grad_y_SD = grad_y_SD.to(dtype)
    up_EHF = (up_w if is_transposed else up_w.transpose(-2, -1)).to(dtype)
    down_EIH = (down_w if is_transposed else down_w.transpose(-2, -1)).to(dtype)
    lora_grads = [None, None, None, None]

    bound = offsets_E[-1:] if bounded else None
    # down projection: y = h @ Wd[e] (+ adapter)
    h_SI = activation.forward(pre_SF, bound)
    grad_down = _weight_grad(h_SI, grad_y_SD, offsets_E, is_transposed, down_w) if weight_grads else None
    grad_h_SI = grouped_mm(grad_y_SD, down_EIH.transpose(-2, -1), offsets_E)
    if lora.down_a is not None:
        grad_h_lora, lora_grads[2], lora_grads[3] = _low_rank_backward(h_SI, grad_y_SD, lora.down_a, lora.down_b,
                                                                        offsets_E, lora.down_scale)
        grad_h_SI = grad_h_SI + grad_h_lora
        del grad_h_lora
    del h_SI, grad_y_SD

    # activation, then up projection: pre = x @ Wu[e] (+ adapter)
    grad_pre_SF = activation.backward(pre_SF, grad_h_SI, in_place=in_place, bound=bound)
    del grad_h_SI, pre_SF
    x_SD = _rows_of(x_TD.to(dtype), token_of_row(perm_S, top_k), bound)
    grad_up = _weight_grad(x_SD, grad_pre_SF, offsets_E, is_transposed, up_w) if weight_grads else None
    grad_x_SD = grouped_mm(grad_pre_SF, up_EHF.transpose(-2, -1), offsets_E)
    if lora.up_a is not None:
        grad_x_lora, lora_grads[0], lora_grads[1] = _low_rank_backward(x_SD, grad_pre_SF, lora.up_a, lora.up_b,
                                                                        offsets_E, lora.up_scale)
        grad_x_SD = grad_x_SD + grad_x_lora
    return grad_x_SD, grad_up, grad_down, tuple(lora_grads)


def _rows_of(x_TD: torch.Tensor, token_S: torch.Tensor, bound: torch.Tensor | None) -> torch.Tensor:
    """x_TD[token_S]; with a bound, only the rows below it (`trainer.kernels.bounded_rows`) where the kernel runs."""
    if bound is not None and bounded_rows.usable(x_TD, token_S, bound):
        return bounded_rows.gather_rows(x_TD, token_S, bound)
    return x_TD.index_select(0, token_S)


# ---- as an autograd Function (any activation, eager) ---------------------------------------------------------------

class _ExpertMLPRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_SD, x_TD, up_w, down_w, perm_S, offsets_E, top_k: int, activation: Activation,
                is_transposed: bool, compute_dtype, up_a, up_b, up_scale: float, down_a, down_b, down_scale: float):
        lora = RowLora(up_a, up_b, up_scale, down_a, down_b, down_scale)
        y_SD, pre_SF = _forward(x_SD, up_w, down_w, offsets_E, activation, is_transposed, compute_dtype, lora=lora)
        ctx.save_for_backward(x_TD, up_w, down_w, perm_S, offsets_E, pre_SF, up_a, up_b, down_a, down_b)
        ctx.top_k, ctx.activation, ctx.is_transposed, ctx.compute_dtype = top_k, activation, is_transposed, compute_dtype
        ctx.scales = (up_scale, down_scale)
        return y_SD

    @staticmethod
    def backward(ctx, grad_y_SD):
        x_TD, up_w, down_w, perm_S, offsets_E, pre_SF, up_a, up_b, down_a, down_b = ctx.saved_tensors
        lora = RowLora(up_a, up_b, ctx.scales[0], down_a, down_b, ctx.scales[1])
        grad_x_SD, grad_up, grad_down, lora_grads = _backward(
            grad_y_SD, x_TD, up_w, down_w, perm_S, offsets_E, pre_SF, ctx.top_k, ctx.activation, ctx.is_transposed,
            ctx.compute_dtype, in_place=True, lora=lora, weight_grads=ctx.needs_input_grad[2] or ctx.needs_input_grad[3])
        d_up_a, d_up_b, d_down_a, d_down_b = lora_grads
        return (grad_x_SD, None, grad_up, grad_down, None, None, None, None, None, None,
                d_up_a, d_up_b, None, d_down_a, d_down_b, None)


# ---- as a custom op pair (SwiGLU / relu^2): opaque to torch.compile, so a compiled layer needs no graph break -----

OP_ACTIVATIONS = ("swiglu", "relu2")


@torch.library.custom_op("moe_stack::expert_mlp_rows", mutates_args=())
def _rows_op(x_SD: torch.Tensor, x_TD: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor, perm_S: torch.Tensor,
             offsets_E: torch.Tensor, top_k: int, activation: str, backend: str, is_transposed: bool,
             compute_dtype: torch.dtype, bounded: bool, up_a: torch.Tensor | None, up_b: torch.Tensor | None,
             up_scale: float, down_a: torch.Tensor | None, down_b: torch.Tensor | None, down_scale: float,
             weight_grads: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x_SD, up_w, down_w, offsets_E, Activation(activation, None, backend), is_transposed, compute_dtype,
                    bounded, RowLora(up_a, up_b, up_scale, down_a, down_b, down_scale))


@_rows_op.register_fake
def _(x_SD, x_TD, up_w, down_w, perm_S, offsets_E, top_k, activation, backend, is_transposed, compute_dtype,
      bounded, up_a, up_b, up_scale, down_a, down_b, down_scale, weight_grads):
    rows, hidden = x_SD.shape
    pre_width = up_w.shape[-1] if is_transposed else up_w.shape[-2]
    return x_SD.new_empty(rows, hidden, dtype=compute_dtype), x_SD.new_empty(rows, pre_width, dtype=compute_dtype)


@torch.library.custom_op("moe_stack::expert_mlp_rows_backward", mutates_args=())
def _rows_op_backward(grad_y_SD: torch.Tensor, x_TD: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor,
                      perm_S: torch.Tensor, offsets_E: torch.Tensor, pre_SF: torch.Tensor, up_a: torch.Tensor | None,
                      up_b: torch.Tensor | None, down_a: torch.Tensor | None, down_b: torch.Tensor | None, top_k: int,
                      activation: str, backend: str, is_transposed: bool, compute_dtype: torch.dtype, bounded: bool,
                      up_scale: float, down_scale: float, weight_grads: bool) -> list[torch.Tensor]:
    """-> [grad_x, grad_up, grad_down, grad up_a, up_b, down_a, down_b]; absent ones as empty tensors (an op
    returns tensors only)."""
    # not in place: a custom op must leave its inputs (here the saved pre-activation) as they were
    grad_x, grad_up, grad_down, lora_grads = _backward(
        grad_y_SD, x_TD, up_w, down_w, perm_S, offsets_E, pre_SF, top_k, Activation(activation, None, backend),
        is_transposed, compute_dtype, in_place=False, bounded=bounded,
        lora=RowLora(up_a, up_b, up_scale, down_a, down_b, down_scale), weight_grads=weight_grads)
    return [g if g is not None else grad_y_SD.new_empty(0) for g in (grad_x, grad_up, grad_down, *lora_grads)]


@_rows_op_backward.register_fake
def _(grad_y_SD, x_TD, up_w, down_w, perm_S, offsets_E, pre_SF, up_a, up_b, down_a, down_b, top_k, activation,
      backend, is_transposed, compute_dtype, bounded, up_scale, down_scale, weight_grads):
    weights = [torch.empty_like(up_w), torch.empty_like(down_w)] if weight_grads else [grad_y_SD.new_empty(0)] * 2
    lora = [torch.empty_like(t) if t is not None else grad_y_SD.new_empty(0) for t in (up_a, up_b, down_a, down_b)]
    return [torch.empty_like(grad_y_SD), *weights, *lora]


_OPTIONS = ("top_k", "activation", "backend", "is_transposed", "compute_dtype", "bounded")


def _op_setup_context(ctx, inputs, output):
    (x_SD, x_TD, up_w, down_w, perm_S, offsets_E, top_k, activation, backend, is_transposed, compute_dtype, bounded,
     up_a, up_b, up_scale, down_a, down_b, down_scale, weight_grads) = inputs
    _, pre_SF = output
    ctx.save_for_backward(x_TD, up_w, down_w, perm_S, offsets_E, pre_SF, up_a, up_b, down_a, down_b)
    ctx.options = (top_k, activation, backend, is_transposed, compute_dtype, bounded, up_scale, down_scale,
                   weight_grads)
    ctx.present = tuple(t is not None for t in (up_a, up_b, down_a, down_b))


def _op_backward(ctx, grad_y_SD, _grad_pre):
    grads = _rows_op_backward(grad_y_SD, *ctx.saved_tensors, *ctx.options)
    grad_x_SD, grad_up, grad_down, *lora_grads = grads
    weight_grads = ctx.options[-1]
    d_up_a, d_up_b, d_down_a, d_down_b = (g if present else None for g, present in zip(lora_grads, ctx.present))
    return (grad_x_SD, None, grad_up if weight_grads else None, grad_down if weight_grads else None,
            None, None, None, None, None, None, None, None, d_up_a, d_up_b, None, d_down_a, d_down_b, None, None)


_rows_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def _weight_grad(in_SK, grad_SN, offsets_E, is_transposed: bool, param: torch.Tensor) -> torch.Tensor:
    """Per-expert in^T @ grad, in the parameter's own layout ([E, out, in] for HF, [E, in, out] if transposed)."""
    num_experts = param.shape[0]
    if is_transposed:
        grad_w = grouped_mm_weight_grad(in_SK, grad_SN, offsets_E, num_experts)  # [E, in, out]
    else:
        grad_w = grouped_mm_weight_grad(grad_SN, in_SK, offsets_E, num_experts)  # [E, out, in]
    return grad_w.to(param.dtype)


def fused_expert_mlp(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    plan: RoutingPlan,
    activation: Activation,
    is_transposed: bool = False,
    keep_TK: torch.Tensor | None = None,
    lora: RowLora = NO_LORA,
) -> torch.Tensor:
    """Routed expert MLP with weighted combine. Returns [T, H] in the compute dtype.

    x_TD [T, H]; weights_TK [T, K]; up_w [E, F, H] (F = 2I gated, I otherwise) and down_w [E, H, I] in HF layout
    (or [E, H, F] / [E, I, H] when is_transposed); plan: the routing plan (`trainer.moe.permute.make_plan`);
    keep_TK: which (token, k) pairs are computed here (None: all; the others sort past the plan's last offset, as in
    `trainer.parallel.allgather`). Under autocast the GEMMs run in the autocast dtype and weight gradients come back
    in the parameters' dtype. `lora`: adapters of the two projections on the same rows (`RowLora`); expert weights
    that do not require grad get no weight-gradient GEMMs.
    """
    compute_dtype = up_w.dtype
    if torch.is_autocast_enabled(x_TD.device.type):
        compute_dtype = torch.get_autocast_dtype(x_TD.device.type)
    with torch.autocast(x_TD.device.type, enabled=False):
        x_SD = permute_tokens(x_TD.to(compute_dtype), plan, keep_TK)
        x_saved = x_TD.detach()  # the backward gathers the rows again from the tokens instead of keeping x_SD
        if activation.kind in OP_ACTIVATIONS:
            weight_grads = up_w.requires_grad or down_w.requires_grad
            y_SD = _rows_op(x_SD, x_saved, up_w, down_w, plan.perm_S, plan.offsets_E, plan.top_k, activation.kind,
                            activation.backend, is_transposed, compute_dtype, keep_TK is not None, *lora,
                            weight_grads)[0]
        else:
            y_SD = _ExpertMLPRows.apply(x_SD, x_saved, up_w, down_w, plan.perm_S, plan.offsets_E, plan.top_k,
                                        activation, is_transposed, compute_dtype, *lora)
        return unpermute_and_combine(y_SD, weights_TK, plan, keep_TK)
