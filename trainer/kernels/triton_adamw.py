"""The Triton kernels of the AdamW update (imported only where Triton is, by `trainer.kernels.adamw` and
`trainer.kernels.expert_update`): the update's arithmetic once (`adamw_math`), and the two kernels that use it.

- `adamw_kernel`: one tensor's update, a block of elements per program.
- `grad_adamw_kernel`: per expert, an output tile of a[rows_e]^T @ b[rows_e] (the weight gradient), then that
  tile's update; the gradient never goes to memory.
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
def adamw_kernel(p_ptr, g_ptr, m_ptr, v_ptr, shadow_ptr, step_ptr, n, lr, beta1, beta2, eps, weight_decay,
                 log2_beta1, log2_beta2, HAS_SHADOW: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    param, exp_avg, exp_avg_sq = adamw_math(
        tl.load(p_ptr + offsets, mask=mask), tl.load(g_ptr + offsets, mask=mask),
        tl.load(m_ptr + offsets, mask=mask), tl.load(v_ptr + offsets, mask=mask), tl.load(step_ptr),
        lr, beta1, beta2, eps, weight_decay, log2_beta1, log2_beta2)
    tl.store(p_ptr + offsets, param.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offsets, exp_avg.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offsets, exp_avg_sq.to(v_ptr.dtype.element_ty), mask=mask)
    if HAS_SHADOW:
        tl.store(shadow_ptr + offsets, param.to(shadow_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grad_adamw_kernel(a_ptr, b_ptr, offsets_ptr, w_ptr, m_ptr, v_ptr, step_ptr, P, Q, stride_a, stride_b,
                      lr, beta1, beta2, eps, weight_decay, log2_beta1, log2_beta2,
                      BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr,
                      INPUT_PRECISION: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_q = tl.program_id(1)
    expert = tl.program_id(2)
    start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0).to(tl.int64)
    end = tl.load(offsets_ptr + expert).to(tl.int64)
    rows_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    rows_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    in_p = rows_p < P
    in_q = rows_q < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        rows_s = s0 + tl.arange(0, BLOCK_S)
        in_s = rows_s < end
        a = tl.load(a_ptr + rows_s[:, None] * stride_a + rows_p[None, :], mask=in_s[:, None] & in_p[None, :],
                    other=0.0)
        b = tl.load(b_ptr + rows_s[:, None] * stride_b + rows_q[None, :], mask=in_s[:, None] & in_q[None, :],
                    other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    offsets = expert.to(tl.int64) * P * Q + rows_p[:, None].to(tl.int64) * Q + rows_q[None, :]
    mask = in_p[:, None] & in_q[None, :]
    # the gradient as the unfused path stores it (the parameter's dtype), then AdamW as torch._fused_adamw_
    grad = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
    param, exp_avg, exp_avg_sq = adamw_math(
        tl.load(w_ptr + offsets, mask=mask), grad, tl.load(m_ptr + offsets, mask=mask),
        tl.load(v_ptr + offsets, mask=mask), tl.load(step_ptr), lr, beta1, beta2, eps, weight_decay,
        log2_beta1, log2_beta2)
    tl.store(w_ptr + offsets, param.to(w_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offsets, exp_avg.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offsets, exp_avg_sq.to(v_ptr.dtype.element_ty), mask=mask)
