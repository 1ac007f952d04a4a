"""The Triton kernel of the AdamW update (imported only where Triton is, by `trainer.kernels.adamw`): the update's
arithmetic (`adamw_math`) and `adamw_kernel`, one tensor's update, a block of elements per program.
"""

import triton
import triton.language as tl


@triton.jit
def adamw_math(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay, log2_beta1, log2_beta2):
    """torch._fused_adamw_'s update, computed in fp32 whatever the inputs' dtype (decoupled weight decay, bias
    corrections from the 1-based step); returns the new (param, exp_avg, exp_avg_sq) in fp32."""
    param = param.to(tl.float32)
    grad = grad.to(tl.float32)
    exp_avg = exp_avg.to(tl.float32)
    exp_avg_sq = exp_avg_sq.to(tl.float32)
    bias_correction1 = 1.0 - tl.exp2(step * log2_beta1)
    bias_correction2_sqrt = tl.sqrt_rn(1.0 - tl.exp2(step * log2_beta2))
    param = param - lr * weight_decay * param
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    # correctly rounded square root and division, as the CUDA kernel it matches (Triton's defaults approximate)
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    param = param - tl.div_rn((lr / bias_correction1) * exp_avg, denom)
    return param, exp_avg, exp_avg_sq


@triton.jit
def adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, shadow_ptr, step_ptr, skip_ptr, scale_ptr, n, lr, beta1, beta2, eps,
                 weight_decay, log2_beta1, log2_beta2, HAS_SHADOW: tl.constexpr, HAS_SKIP: tl.constexpr,
                 HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    if HAS_SKIP:  # a skipped (non-finite) step: every load and store masked off, decided on the device
        mask = mask & (tl.load(skip_ptr) == 0.0)
    grad = tl.load(g_ptr + offsets, mask=mask)
    if HAS_SCALE:  # gradient clipping folded in: the gradient divided by the device-held scale
        grad = grad.to(tl.float32) / tl.load(scale_ptr)
    param, exp_avg, exp_avg_sq = adamw_math(
        tl.load(p_ptr + offsets, mask=mask), grad,
        tl.load(m_ptr + offsets, mask=mask), tl.load(v_ptr + offsets, mask=mask), tl.load(step_ptr),
        lr, beta1, beta2, eps, weight_decay, log2_beta1, log2_beta2)
    tl.store(p_ptr + offsets, param.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offsets, exp_avg.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offsets, exp_avg_sq.to(v_ptr.dtype.element_ty), mask=mask)
    if HAS_SHADOW:
        tl.store(shadow_ptr + offsets, param.to(shadow_ptr.dtype.element_ty), mask=mask)
