"""A model's shape, read from its HF config alone (no weights): the blocks of every layer and their dimensions.

Every supported family is described as a list of layers, each a tuple of blocks; each block has one pre-norm.
Qwen3-MoE / Mixtral / DeepSeek-V3 layers are (attention-or-MLA, MoE-or-dense MLP); a Nemotron-H layer is a single
block (Mamba2, MoE, attention or dense MLP). Parameter counts follow transformers 5.17's modules exactly
(checked against `sum(p.numel())` of the meta-device models in the tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.errors import UserError


@dataclass(frozen=True)
class Attention:
    """Grouped-query attention (sdpa). `qk_norm`: Qwen3's per-head RMSNorm on q and k."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qk_norm: bool = False

    def params(self, hidden: int) -> int:
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return hidden * (2 * q_dim + 2 * kv_dim) + (2 * self.head_dim if self.qk_norm else 0)


@dataclass(frozen=True)
class MLA:
    """DeepSeek-V3 multi-head latent attention (low-rank q and kv projections, decoupled rope dims)."""

    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def params(self, hidden: int) -> int:
        q_out = self.num_heads * self.qk_head_dim
        if self.q_lora_rank:
            q = hidden * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * q_out
        else:
            q = hidden * q_out
        kv_a = hidden * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv_b = self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
        return q + kv_a + kv_b + self.num_heads * self.v_head_dim * hidden


@dataclass(frozen=True)
class Mamba2:
    """Nemotron-H Mamba2 mixer: in_proj -> depthwise conv -> SSD scan -> gated RMSNorm -> out_proj."""

    num_heads: int
    head_dim: int
    state_size: int
    n_groups: int
    conv_kernel: int

    @property
    def inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.inner + 2 * self.n_groups * self.state_size

    @property
    def in_proj_dim(self) -> int:
        return self.inner + self.conv_dim + self.num_heads

    def params(self, hidden: int) -> int:
        in_proj = hidden * self.in_proj_dim
        conv = self.conv_dim * self.conv_kernel + self.conv_dim
        return in_proj + conv + 3 * self.num_heads + self.inner + self.inner * hidden


@dataclass(frozen=True)
class DenseMLP:
    """A dense feed-forward block; `gated`: SwiGLU (gate, up, down) else up -> act -> down (Nemotron relu2)."""

    intermediate: int
    gated: bool = True

    def params(self, hidden: int) -> int:
        return (3 if self.gated else 2) * hidden * self.intermediate


@dataclass(frozen=True)
class MoE:
    """Routed experts (+ optional shared expert). `router_fp32`: the router matmul runs in fp32 (DeepSeek/Nemotron)."""

    num_experts: int
    top_k: int
    intermediate: int
    gated: bool = True
    shared_intermediate: int = 0
    router_fp32: bool = False
    router_bias: bool = False  # e_score_correction_bias is a buffer, not a parameter: kept for clarity only

    def expert_params(self, hidden: int) -> int:
        return self.num_experts * (3 if self.gated else 2) * hidden * self.intermediate

    def non_expert_params(self, hidden: int) -> int:
        shared = DenseMLP(self.shared_intermediate, self.gated).params(hidden) if self.shared_intermediate else 0
        return self.num_experts * hidden + shared


Block = Attention | MLA | Mamba2 | DenseMLP | MoE


@dataclass(frozen=True)
class ModelShape:
    """Everything the planner needs about a model. `layers[i]` is the tuple of blocks of decoder layer i."""

    family: str
    vocab_size: int
    hidden: int
    layers: tuple[tuple[Block, ...], ...]
    tie_embeddings: bool = False
    logits_fp32: bool = False  # the model itself upcasts logits (Nemotron-H) - changes what outputs hold
    name: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    # ---- parameter counts -------------------------------------------------------------------------------------
    def block_params(self, block: Block) -> tuple[int, int]:
        """(expert params, non-expert params) of one block, its pre-norm included."""
        norm = self.hidden
        if isinstance(block, MoE):
            return block.expert_params(self.hidden), block.non_expert_params(self.hidden) + norm
        return 0, block.params(self.hidden) + norm

    def layer_params(self, layer: tuple[Block, ...]) -> tuple[int, int]:
        pairs = [self.block_params(b) for b in layer]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    @property
    def root_params(self) -> int:
        """Embedding + final norm + lm_head (the parameters outside the decoder layers)."""
        return self.vocab_size * self.hidden * (1 if self.tie_embeddings else 2) + self.hidden

    @property
    def expert_params(self) -> int:
        return sum(self.layer_params(layer)[0] for layer in self.layers)

    @property
    def non_expert_params(self) -> int:
        return sum(self.layer_params(layer)[1] for layer in self.layers) + self.root_params

    @property
    def total_params(self) -> int:
        return self.expert_params + self.non_expert_params

    @property
    def moe_blocks(self) -> list[MoE]:
        return [b for layer in self.layers for b in layer if isinstance(b, MoE)]

    @property
    def num_experts(self) -> int:
        """Experts per MoE block (the smallest, if they differ): EP must divide it."""
        return min((b.num_experts for b in self.moe_blocks), default=1)


# ---- reading HF configs ---------------------------------------------------------------------------------------

NEMOTRON_LETTERS = {"M": "mamba", "E": "moe", "*": "attention", "-": "mlp"}
NEMOTRON_NAMES = {
    "mamba": "mamba", "linear_attention": "mamba", "mamba2": "mamba",
    "attention": "attention", "full_attention": "attention",
    "moe": "moe", "mlp": "mlp", "dense": "mlp",
}


class _Fields:
    """Read a field from a HF `PretrainedConfig` or from a plain dict (config.json), the same way."""

    def __init__(self, source: Any):
        self.source = source

    def get(self, name: str, default: Any = None) -> Any:
        if isinstance(self.source, dict):
            value = self.source.get(name, default)
        else:
            try:
                value = getattr(self.source, name, default)
            except Exception:  # noqa: BLE001 - some HF config properties raise when a field is missing
                value = default
        return default if value is None else value

    def need(self, name: str) -> Any:
        value = self.get(name)
        if value is None:
            raise UserError(f"model config has no '{name}'", "pass a complete config.json for the model")
        return value


def shape_from_config(config: Any, name: str = "") -> ModelShape:
    """Build a ModelShape from a HF config object or a config.json dict.

    Families: qwen3_moe (and qwen2_moe / olmoe-like layouts), mixtral, deepseek_v3, nemotron_h; any other config
    with `num_experts` / `num_local_experts` / `n_routed_experts` is read as attention + MoE per layer.
    """
    f = _Fields(config)
    family = f.get("model_type", "")
    reader = {"nemotron_h": _nemotron_h, "deepseek_v3": _deepseek_v3, "mixtral": _mixtral}.get(family, _qwen_like)
    layers, extra = reader(f)
    return ModelShape(
        family=family or "generic",
        vocab_size=int(f.need("vocab_size")),
        hidden=int(f.need("hidden_size")),
        layers=tuple(layers),
        tie_embeddings=bool(f.get("tie_word_embeddings", False)),
        logits_fp32=family == "nemotron_h",
        name=name,
        extra=extra,
    )


def _gqa(f: _Fields, qk_norm: bool) -> Attention:
    heads = int(f.need("num_attention_heads"))
    head_dim = f.get("head_dim") or int(f.need("hidden_size")) // heads
    return Attention(heads, int(f.get("num_key_value_heads", heads)), int(head_dim), qk_norm)


def _qwen_like(f: _Fields) -> tuple[list, dict]:
    experts = f.get("num_experts") or f.get("num_local_experts") or f.get("n_routed_experts") or 0
    if not experts:
        raise UserError(
            f"model type '{f.get('model_type', '?')}' has no experts in its config",
            "the planner supports MoE configs (qwen3_moe, mixtral, deepseek_v3, nemotron_h)",
        )
    qk_norm = f.get("model_type", "") in ("qwen3_moe", "qwen3_next", "qwen3_vl_moe")
    attention = _gqa(f, qk_norm)
    mlp_only = set(f.get("mlp_only_layers", []) or [])
    step = int(f.get("decoder_sparse_step", 1) or 1)
    shared = int(f.get("shared_expert_intermediate_size", 0) or 0)
    moe = MoE(int(experts), int(f.need("num_experts_per_tok")), int(f.need("moe_intermediate_size")),
              shared_intermediate=shared)
    dense = DenseMLP(int(f.get("intermediate_size", 0)))
    layers = []
    for i in range(int(f.need("num_hidden_layers"))):
        is_moe = i not in mlp_only and (i + 1) % step == 0
        layers.append((attention, moe if is_moe else dense))
    return layers, {}


def _mixtral(f: _Fields) -> tuple[list, dict]:
    moe = MoE(int(f.need("num_local_experts")), int(f.need("num_experts_per_tok")), int(f.need("intermediate_size")))
    return [(_gqa(f, False), moe) for _ in range(int(f.need("num_hidden_layers")))], {}


def _deepseek_v3(f: _Fields) -> tuple[list, dict]:
    mla = MLA(
        num_heads=int(f.need("num_attention_heads")),
        q_lora_rank=f.get("q_lora_rank"),
        kv_lora_rank=int(f.need("kv_lora_rank")),
        qk_nope_head_dim=int(f.need("qk_nope_head_dim")),
        qk_rope_head_dim=int(f.need("qk_rope_head_dim")),
        v_head_dim=int(f.need("v_head_dim")),
    )
    moe_inter = int(f.need("moe_intermediate_size"))
    moe = MoE(int(f.need("n_routed_experts")), int(f.need("num_experts_per_tok")), moe_inter,
              shared_intermediate=moe_inter * int(f.get("n_shared_experts", 0)), router_fp32=True)
    dense = DenseMLP(int(f.need("intermediate_size")))
    first_dense = int(f.get("first_k_dense_replace", 0))
    return [(mla, dense if i < first_dense else moe) for i in range(int(f.need("num_hidden_layers")))], {}


def nemotron_layer_kinds(f: Any) -> list[str]:
    """Nemotron-H layer kinds ('mamba' | 'moe' | 'attention' | 'mlp') from `layers_block_type` (list, 5.x) or
    `hybrid_override_pattern` (string of M/E/*/-, the published checkpoints)."""
    f = f if isinstance(f, _Fields) else _Fields(f)
    kinds = f.get("layers_block_type") or f.get("layer_types")
    if kinds:
        unknown = [k for k in kinds if k not in NEMOTRON_NAMES]
        if unknown:
            raise UserError(f"unknown Nemotron-H layer type(s) {unknown}", f"use {sorted(NEMOTRON_NAMES)}")
        return [NEMOTRON_NAMES[k] for k in kinds]
    pattern = f.get("hybrid_override_pattern")
    if not pattern:
        raise UserError("nemotron_h config has neither layers_block_type nor hybrid_override_pattern",
                        "add one of them to the config")
    unknown = sorted(set(pattern) - set(NEMOTRON_LETTERS))
    if unknown:
        raise UserError(f"hybrid_override_pattern has unknown letters {unknown}", "use M (mamba2), E (moe), * (attention), - (mlp)")
    return [NEMOTRON_LETTERS[c] for c in pattern]


def _nemotron_h(f: _Fields) -> tuple[list, dict]:
    heads = int(f.need("num_attention_heads"))
    blocks = {
        "attention": Attention(heads, int(f.get("num_key_value_heads", heads)), int(f.get("head_dim", 128))),
        "mamba": Mamba2(int(f.need("mamba_num_heads")), int(f.need("mamba_head_dim")), int(f.need("ssm_state_size")),
                        int(f.get("n_groups", 1)), int(f.get("conv_kernel", 4))),
        "moe": MoE(int(f.need("n_routed_experts")), int(f.need("num_experts_per_tok")),
                   int(f.need("moe_intermediate_size")), gated=False,
                   shared_intermediate=int(f.get("moe_shared_expert_intermediate_size", 0))
                   * (1 if int(f.get("n_shared_experts", 1)) else 0),
                   router_fp32=True),
        "mlp": DenseMLP(int(f.get("intermediate_size", 0)), gated=False),
    }
    return [(blocks[kind],) for kind in nemotron_layer_kinds(f)], {}
