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
  quadratic term (chunk_size ~ 128) is left out, as peers do. Mamba1 (Jamba) has the same state term with
  d_inner = mamba_expand * hidden; its projections are in_proj, the conv, x_proj, dt_proj and out_proj.
MFU = FLOP/s per GPU / 989e12 (dense bf16 peak of one H100/H200 SXM).

Layer layouts: decoder layers (attention + MoE or dense MLP, with the usual sparse-step / first-dense rules);
Nemotron-H, where each layer is one block (`layers_block_type` names mamba, moe, attention, mlp); and Jamba /
GraniteMoeHybrid, where each layer is a mixer (mamba or attention) plus an MoE or MLP (`layers_block_type` names
only the mixer; Jamba's `layers_num_experts` says which layers are dense). Multimodal configs count their text model
(`get_text_config()`): the vision tower runs once per image, not per trained token.
"""

from __future__ import annotations

PEAK_TFLOPS = 989.0


def _get(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


MIXERS = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention", "attention": "attention"}


def _text(config):
    """The language model's config (itself, or `text_config` of a multimodal config)."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if get_text_config is not None else config


def layer_kinds(config) -> list[str]:
    """Per layer: "attention+moe", "attention+mlp" (decoder layers), "mamba", "moe", "mlp", "attention" (one block
    per layer, Nemotron-H) or "mamba+moe", "attention+mlp", ... (a mixer plus a feed-forward, Jamba / Granite)."""
    config = _text(config)
    num_experts = _get(config, "num_experts", "num_local_experts", "n_routed_experts", default=0) or 0
    pattern = _get(config, "layers_block_type")
    if isinstance(pattern, (list, tuple)):
        names = [str(kind) for kind in pattern]
        if any(name in ("moe", "mlp") for name in names):  # one block per layer
            return [MIXERS.get(name, name) for name in names]
        per_layer = _get(config, "layers_num_experts")  # Jamba: 1 means a dense MLP in that layer
        return [f"{MIXERS.get(name, name)}+"
                f"{'moe' if (per_layer[i] > 1 if isinstance(per_layer, (list, tuple)) else num_experts > 0) else 'mlp'}"
                for i, name in enumerate(names)]
    layers = int(_get(config, "num_hidden_layers"))
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
    top_k = _get(config, "num_experts_per_tok", default=1)
    inter = _get(config, "moe_intermediate_size", "intermediate_size")
    mats = 3 if _is_gated(config) else 2
    shared_inter = _get(config, "moe_shared_expert_intermediate_size", "shared_expert_intermediate_size",
                        "shared_intermediate_size")
    n_shared = _get(config, "n_shared_experts", default=0) or 0
    if shared_inter:  # one shared MLP of this width (Qwen2-MoE, Nemotron-H, GraniteMoeHybrid)
        shared = mats * hidden * shared_inter
    else:  # DeepSeek style: n_shared experts of the routed width
        shared = mats * hidden * inter * n_shared
    return hidden * num_experts + top_k * mats * hidden * inter + shared


def _dense_mlp_params(config) -> int:
    mats = 3 if _is_gated(config) else 2
    return mats * config.hidden_size * config.intermediate_size


def _mamba_dims(config) -> tuple[int, int, int, int]:
    """(d_inner, groups, state size, conv width) of a Mamba layer, from Nemotron-H's, Granite's or Jamba's names."""
    heads = _get(config, "mamba_num_heads", "mamba_n_heads")
    head_dim = _get(config, "mamba_head_dim", "mamba_d_head")
    if isinstance(heads, int) and isinstance(head_dim, int):
        d_inner = heads * head_dim
    else:  # Mamba1 (Jamba): no heads
        d_inner = int(_get(config, "mamba_expand", default=2)) * config.hidden_size
    groups = _get(config, "n_groups", "mamba_n_groups", default=1)
    state = _get(config, "ssm_state_size", "mamba_d_state", "state_size")
    conv = _get(config, "conv_kernel", "mamba_d_conv", default=4)
    return d_inner, groups, state, conv


def _mamba_params(config) -> int:
    hidden = config.hidden_size
    d_inner, groups, state, conv = _mamba_dims(config)
    heads = _get(config, "mamba_num_heads", "mamba_n_heads")
    if not isinstance(heads, int):  # Mamba1: x_proj to (dt, B, C), dt_proj back to d_inner
        dt_rank = _get(config, "mamba_dt_rank", default="auto")
        dt_rank = -(-hidden // 16) if dt_rank == "auto" else int(dt_rank)
        return hidden * 2 * d_inner + d_inner * conv + d_inner * (dt_rank + 2 * state) + dt_rank * d_inner \
            + d_inner * hidden
    groups_state = 2 * groups * state
    in_proj = hidden * (2 * d_inner + groups_state + heads)
    return in_proj + (d_inner + groups_state) * conv + d_inner * hidden


def matmul_params_per_token(config) -> int:
    """Parameters each token multiplies in the forward (top-k experts only; no input embedding)."""
    config = _text(config)
    total = config.hidden_size * config.vocab_size  # LM head
    for kind in layer_kinds(config):
        parts = kind.split("+")
        if "attention" in parts:
            total += _attention_params(config)
        if "mamba" in parts:
            total += _mamba_params(config)
        if "moe" in parts:
            total += _moe_params_per_token(config)
        elif "mlp" in parts:
            total += _dense_mlp_params(config)
    return total


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context seq_len; see the module docstring."""
    config = _text(config)
    kinds = layer_kinds(config)
    heads = config.num_attention_heads
    head_dim = _get(config, "head_dim", default=config.hidden_size // heads)
    attention_layers = sum(1 for kind in kinds if "attention" in kind.split("+"))
    flops = 6.0 * matmul_params_per_token(config)
    flops += 6.0 * attention_layers * heads * head_dim * seq_len
    mamba_layers = sum(1 for kind in kinds if "mamba" in kind.split("+"))
    if mamba_layers:
        d_inner, _, state, _ = _mamba_dims(config)
        flops += 12.0 * mamba_layers * d_inner * state
    return flops


def throughput_metrics(config, seq_len: int, tokens_per_s_per_gpu: float) -> dict:
    """tokens/s/GPU -> TFLOP/s/GPU and MFU (vs PEAK_TFLOPS)."""
    tflops = flops_per_token(config, seq_len) * tokens_per_s_per_gpu / 1e12
    return {"tflops_per_gpu": tflops, "mfu": tflops / PEAK_TFLOPS}
