"""Model FLOPs per trained token from a HF config (forward + backward), so MFU compares across runs and with peers.

    flops_per_token = 6 * matmul_params_per_token                                  (dense and projection matmuls)
                    + 6 * n_attention_layers * n_heads * head_dim * seq_len         (causal attention scores + values)
                    + 12 * n_mamba_layers * d_inner * ssm_state_size                (Mamba2 SSD state terms)

- matmul_params_per_token: attention q/k/v/o projections; per MoE layer the router, the top-k routed experts
  (3 * H * I gated, 2 * H * I non-gated each) and the shared experts; dense MLP layers; Mamba2 in_proj, the
  depthwise conv and out_proj; the LM head. Not the input embedding (a lookup).
- attention: QK^T and PV are 2 * n_heads * head_dim * seq_len FLOPs each per token in the forward, x3 with backward
  = 12 * n_heads * head_dim * seq_len; causal masking halves the useful part.
- Mamba2 SSD: per token and head, B^T x into the state and C . state out are 2 * N * P FLOPs each (N state size,
  P head dim) in the forward, x3 with backward = 12 * d_inner * N per layer (d_inner = heads * P). The chunk-local
  quadratic term (chunk_size ~ 128) is left out, as peers do.
MFU = FLOP/s per GPU / 989e12 (dense bf16 peak of one H100/H200 SXM).
"""

from __future__ import annotations

PEAK_TFLOPS = 989.0


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def layer_kinds(config) -> list[str]:
    """One of "attention+moe", "attention+mlp" (decoder layers) or "mamba", "moe", "mlp", "attention" (hybrid)."""
    pattern = _get(config, "layers_block_type")
    if isinstance(pattern, (list, tuple)):
        names = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention", "attention": "attention",
                 "moe": "moe", "mlp": "mlp"}
        return [names.get(str(kind), str(kind)) for kind in pattern]
    layers = int(_get(config, "num_hidden_layers"))
    num_experts = _get(config, "num_experts", "num_local_experts", "n_routed_experts", default=0) or 0
    sparse_step = _get(config, "decoder_sparse_step", default=1) or 1
    mlp_only = set(_get(config, "mlp_only_layers", default=[]) or [])
    first_dense = _get(config, "first_k_dense_replace", default=0) or 0
    kinds = []
    for i in range(layers):
        is_moe = num_experts > 0 and i not in mlp_only and (i + 1) % sparse_step == 0 and i >= first_dense
        kinds.append("attention+moe" if is_moe else "attention+mlp")
    return kinds


def _attention_params(config) -> int:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = _get(config, "num_key_value_heads", default=heads)
    head_dim = _get(config, "head_dim", default=hidden // heads)
    return hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden


def _is_gated(config) -> bool:
    act = str(_get(config, "mlp_hidden_act", "hidden_act", default="silu"))
    return act not in ("relu2", "relu_squared", "gelu", "relu")


def _moe_params_per_token(config) -> int:
    hidden = config.hidden_size
    num_experts = _get(config, "num_experts", "num_local_experts", "n_routed_experts")
    top_k = _get(config, "num_experts_per_tok")
    inter = _get(config, "moe_intermediate_size", "intermediate_size")
    mats = 3 if _is_gated(config) else 2
    shared_inter = _get(config, "moe_shared_expert_intermediate_size", "shared_expert_intermediate_size")
    n_shared = _get(config, "n_shared_experts", default=0) or 0
    if shared_inter:  # one shared MLP of this width (Qwen2-MoE, Nemotron-H)
        shared = mats * hidden * shared_inter
    else:  # DeepSeek style: n_shared experts of the routed width
        shared = mats * hidden * inter * n_shared
    return hidden * num_experts + top_k * mats * hidden * inter + shared


def _dense_mlp_params(config) -> int:
    mats = 3 if _is_gated(config) else 2
    return mats * config.hidden_size * config.intermediate_size


def _mamba_params(config) -> int:
    hidden = config.hidden_size
    heads, head_dim = config.mamba_num_heads, config.mamba_head_dim
    d_inner = heads * head_dim
    groups_state = 2 * config.n_groups * config.ssm_state_size
    in_proj = hidden * (2 * d_inner + groups_state + heads)
    conv = (d_inner + groups_state) * config.conv_kernel
    return in_proj + conv + d_inner * hidden


def matmul_params_per_token(config) -> int:
    """Parameters each token multiplies in the forward (top-k experts only; no input embedding)."""
    total = config.hidden_size * config.vocab_size  # LM head
    for kind in layer_kinds(config):
        if "attention" in kind:
            total += _attention_params(config)
        if kind.endswith("moe"):
            total += _moe_params_per_token(config)
        elif kind.endswith("mlp"):
            total += _dense_mlp_params(config)
        elif kind == "mamba":
            total += _mamba_params(config)
    return total


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context seq_len; see the module docstring."""
    kinds = layer_kinds(config)
    heads = config.num_attention_heads
    head_dim = _get(config, "head_dim", default=config.hidden_size // heads)
    attention_layers = sum(1 for kind in kinds if "attention" in kind)
    flops = 6.0 * matmul_params_per_token(config)
    flops += 6.0 * attention_layers * heads * head_dim * seq_len
    mamba_layers = sum(1 for kind in kinds if kind == "mamba")
    if mamba_layers:
        flops += 12.0 * mamba_layers * config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size
    return flops


def throughput_metrics(config, seq_len: int, tokens_per_s_per_gpu: float) -> dict:
    """tokens/s/GPU -> TFLOP/s/GPU and MFU (vs PEAK_TFLOPS)."""
    tflops = flops_per_token(config, seq_len) * tokens_per_s_per_gpu / 1e12
    return {"tflops_per_gpu": tflops, "mfu": tflops / PEAK_TFLOPS}
