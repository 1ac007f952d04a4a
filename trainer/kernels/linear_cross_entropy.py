"""Linear + cross-entropy without ever holding the full-vocabulary logits.

The LM head of a 152k-vocabulary model on 16k tokens would materialise [16384, 151936] logits: 5 GB in bf16 and
10 GB more once upcast to fp32 for the loss, plus their gradient. Here the tokens are processed in chunks: each
chunk's logits are formed, turned into its loss and its gradient w.r.t. the logits, and immediately contracted into
the gradients w.r.t. the hidden states and the head weight. Only those two gradients (the size of the inputs) stay
alive until backward, which just scales them by the incoming gradient.

    loss_sum = linear_cross_entropy_sum(h_ND, w_VD, targets_N)     # fp32 [], sum over targets != ignore_index

The chunked torch implementation below runs on any device; on CUDA each chunk's loss and logit gradient run as one
torch.compile'd function. With ~1,700-row chunks (Liger's fused kernel uses ~256) the head-weight gradient is
accumulated 10x less often. `reference_linear_cross_entropy_sum` is the plain formula it is tested against.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from trainer.kernels.ce_chunks import DEFAULT_CHUNK_BYTES, chunk_rows

IGNORE_INDEX = -100


def reference_linear_cross_entropy_sum(
    h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Plain formula: full logits [N, V] in the input dtype, upcast to fp32, summed token cross-entropy []."""
    logits_NV = F.linear(h_ND, w_VD).float()
    return F.cross_entropy(logits_NV, targets_N, ignore_index=ignore_index, reduction="sum")


def _chunk_loss_and_logit_grad(logits_CV: torch.Tensor, t_C: torch.Tensor, ignore_index: int):
    """One chunk: summed cross-entropy (fp32 []) and d loss / d logits in the logits' dtype (softmax - onehot, 0 on
    ignored rows).

    Written as plain tensor ops so that torch.compile can turn it into two passes over the chunk (a row reduction
    and one pointwise kernel that writes the gradient); eager it is the same formula.
    """
    dtype = logits_CV.dtype
    logits_CV = logits_CV.float()
    valid_C = t_C != ignore_index
    safe_t_C = torch.where(valid_C, t_C, torch.zeros_like(t_C))
    lse_C = torch.logsumexp(logits_CV, dim=-1)
    target_logit_C = logits_CV.gather(1, safe_t_C.unsqueeze(1)).squeeze(1)
    loss = ((lse_C - target_logit_C) * valid_C).sum()
    columns_V = torch.arange(logits_CV.shape[1], device=logits_CV.device)
    onehot_CV = (columns_V.unsqueeze(0) == safe_t_C.unsqueeze(1)).to(logits_CV.dtype)
    grad_CV = (torch.exp(logits_CV - lse_C.unsqueeze(1)) - onehot_CV) * valid_C.unsqueeze(1).to(logits_CV.dtype)
    return loss, grad_CV.to(dtype)


_compiled_chunk = None  # torch.compile of the chunk function, built at first CUDA use; False once compiling failed


def _compiled_chunk_loss_and_logit_grad(logits_CV, t_C, ignore_index: int):
    """The chunk function compiled (reads the logits twice, writes the gradient once); if compiling fails, the same
    formula eagerly from then on in this process, with a warning."""
    global _compiled_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_chunk_loss_and_logit_grad, dynamic=False)
    if _compiled_chunk is not False:
        try:
            return _compiled_chunk(logits_CV, t_C, ignore_index)
        except Exception as err:  # no triton / an Inductor bug on this torch
            warnings.warn(f"compiled cross-entropy chunk failed ({type(err).__name__}: {err}); running it eagerly")
            _compiled_chunk = False
    return _chunk_loss_and_logit_grad(logits_CV, t_C, ignore_index)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both input gradients chunk by chunk; backward scales the stored gradients."""

    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N, ignore_index: int, chunk_rows: int, accum_fp32: bool, compiled: bool):
        num_rows = h_ND.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h_ND = torch.empty_like(h_ND) if need_h else None
        grad_w_VD = None
        if need_w:
            grad_w_VD = torch.zeros_like(w_VD, dtype=torch.float32 if accum_fp32 else w_VD.dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        chunk_fn = _compiled_chunk_loss_and_logit_grad if compiled and h_ND.is_cuda else _chunk_loss_and_logit_grad
        for start in range(0, num_rows, chunk_rows):
            h_CD = h_ND[start:start + chunk_rows]
            logits_CV = F.linear(h_CD, w_VD)  # input dtype: the chunk function upcasts inside
            loss_C, grad_CV = chunk_fn(logits_CV, targets_N[start:start + chunk_rows], ignore_index)
            del logits_CV
            loss_sum += loss_C
            if need_h:
                torch.mm(grad_CV, w_VD, out=grad_h_ND[start:start + chunk_rows])
            if need_w:
                if grad_w_VD.dtype == grad_CV.dtype:
                    grad_w_VD.addmm_(grad_CV.t(), h_CD)
                else:
                    grad_w_VD.add_(torch.mm(grad_CV.t(), h_CD).float())
            del grad_CV
        ctx.save_for_backward(grad_h_ND, grad_w_VD)
        ctx.w_dtype = w_VD.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        scale = grad_loss.float()
        grad_h = None if grad_h_ND is None else (grad_h_ND * scale.to(grad_h_ND.dtype))
        # the [V, D] head-weight gradient times a 0-dim device tensor: the foreach kernel reads the scalar once and
        # streams the rows (a plain broadcast multiply runs TensorIterator's strided kernel, ~3x slower on an H200)
        grad_w = None if grad_w_VD is None else torch._foreach_mul([grad_w_VD], scale)[0].to(ctx.w_dtype)
        return grad_h, grad_w, None, None, None, None, None


def chunked_linear_cross_entropy_sum(
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    targets_N: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    accum_fp32: bool = False,
    compiled: bool = True,
) -> torch.Tensor:
    """Summed token cross-entropy of `h_ND @ w_VD.T` against targets [N], fp32 []; peak extra memory ~chunk_bytes.

    h_ND: hidden states [N, D]; w_VD: LM head weight [V, D] (same dtype); targets_N: int64, `ignore_index` skipped.
    accum_fp32: accumulate the head-weight gradient in fp32 (one fp32 [V, D] buffer) instead of the weight dtype.
    compiled: on CUDA, run each chunk's loss and logit gradient as one torch.compile'd function (two fused passes
    over the chunk instead of ~7 eager ones); CPU always runs eagerly.
    """
    rows = chunk_rows(h_ND.shape[0], w_VD.shape[0], chunk_bytes)
    return _ChunkedLinearCrossEntropy.apply(h_ND, w_VD, targets_N, ignore_index, rows, accum_fp32, compiled)


def linear_cross_entropy_sum(
    h_ND: torch.Tensor,
    w_VD: torch.Tensor,
    targets_N: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
) -> torch.Tensor:
    """Summed token cross-entropy [] (fp32) of the LM head applied to h_ND [N, D], never forming [N, V] logits.

    backend: "chunked" (torch; on CUDA each chunk's loss and logit gradient is one compiled function), "auto" (=
    chunked: measured faster than Liger's fused kernel on B1 in an earlier set, which is why that one is gone),
    "reference" (full logits, for tests).
    """
    if backend == "reference":
        return reference_linear_cross_entropy_sum(h_ND, w_VD, targets_N, ignore_index)
    if backend not in ("auto", "chunked"):
        raise ValueError(f"unknown linear cross-entropy backend {backend!r}")
    return chunked_linear_cross_entropy_sum(h_ND, w_VD, targets_N, ignore_index)


def shift_labels(labels_BS: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets [B, S] the way transformers forms them: labels shifted left, last position ignored."""
    return F.pad(labels_BS[:, 1:], (0, 1), value=ignore_index)
