"""The planner's arithmetic: parameter counts, per-rank bytes, activation bytes, checked by hand and against HF."""

import pytest
import torch
import transformers

from trainer.errors import UserError
from trainer.planner import Layout, PlanOptions, estimate_memory, load_model_config, shape_from_config
from trainer.planner.activations import ActivationContext, block_bytes
from trainer.planner.hardware import GiB
from trainer.planner.memory import unit_params
from trainer.planner.model_shape import MoE

HF_BASELINE = PlanOptions(precision="bf16", keep_outputs=True, fsdp=False)

TINY = {
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=96, hidden_size=16, intermediate_size=32,
                      moe_intermediate_size=8, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=8, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1]),
    "mixtral": dict(model_type="mixtral", vocab_size=96, hidden_size=16, intermediate_size=8, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(model_type="deepseek_v3", vocab_size=96, hidden_size=16, intermediate_size=32,
                        moe_intermediate_size=8, num_hidden_layers=3, first_k_dense_replace=1,
                        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=12, kv_lora_rank=8,
                        qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=4,
                        n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1),
    "nemotron_h": dict(model_type="nemotron_h", vocab_size=96, hidden_size=16, hybrid_override_pattern="ME*-",
                       num_attention_heads=4, num_key_value_heads=2, head_dim=4, intermediate_size=24,
                       mamba_num_heads=4, mamba_head_dim=8, ssm_state_size=8, n_groups=2, conv_kernel=4, expand=2,
                       n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=8,
                       moe_shared_expert_intermediate_size=12),
}


def hf_param_count(config_dict: dict) -> int:
    fields = dict(config_dict)
    config = transformers.CONFIG_MAPPING[fields.pop("model_type")](**fields)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", sorted(TINY))
def test_parameter_count_matches_the_transformers_model(family):
    assert shape_from_config(TINY[family]).total_params == hf_param_count(TINY[family])


def test_parameter_count_of_the_benchmark_qwen3_shape_is_8_10_billion():
    shape = shape_from_config(load_model_config("Qwen/Qwen3-30B-A3B", {"num_hidden_layers": 12}))
    assert shape.total_params == 8_099_779_584


def test_nemotron_pattern_string_and_layer_list_give_the_same_shape():
    as_pattern = shape_from_config(TINY["nemotron_h"])
    as_list = dict(TINY["nemotron_h"], layers_block_type=["mamba", "moe", "attention", "mlp"])
    del as_list["hybrid_override_pattern"]
    as_new_names = dict(as_list, layers_block_type=["linear_attention", "moe", "full_attention", "mlp"])
    assert as_pattern.layers == shape_from_config(as_list).layers == shape_from_config(as_new_names).layers


def test_nemotron_unknown_pattern_letter_is_a_user_error():
    with pytest.raises(UserError, match="unknown letters"):
        shape_from_config(dict(TINY["nemotron_h"], hybrid_override_pattern="MEX"))


def test_qwen3_mlp_only_layers_are_dense():
    shape = shape_from_config(TINY["qwen3_moe"])
    assert [isinstance(layer[1], MoE) for layer in shape.layers] == [True, False, True]


# A model small enough to count by hand: H=4, V=10, one layer (attention 1 head x 4, MoE 2 experts top-1, I=2).
HAND = dict(model_type="mixtral", vocab_size=10, hidden_size=4, intermediate_size=2, num_hidden_layers=1,
            num_attention_heads=1, num_key_value_heads=1, head_dim=4, num_local_experts=2, num_experts_per_tok=1)


def test_hand_counted_parameters():
    # embed 40 + lm_head 40 + final norm 4; attention 4 x 16 = 64; 2 norms 8; experts 2 x 3 x 4 x 2 = 48; router 8
    assert shape_from_config(HAND).total_params == 212 == hf_param_count(HAND)


def test_hand_counted_activation_bytes_per_token():
    shape = shape_from_config(HAND)
    attention, moe = shape.layers[0]
    ctx = ActivationContext(hidden=4, compute_bytes=2)
    # norm: fp32 copy 16 + bf16 normalised 8 = 24; q, k, v, out 8 bytes each + lse 4 bytes
    assert block_bytes(attention, ctx).saved == 24 + 36
    # norm 24; router: fp32 softmax 8 + bf16 logits 4 + top-k 12; one row: input 8 + up/act/product 16 + index 32;
    # token side: the expert output read by the weighted sum, 8
    assert block_bytes(moe, ctx).saved == 24 + 24 + 56 + 8


def test_hand_counted_peak_of_a_bf16_step():
    shape = shape_from_config(HAND)
    memory = estimate_memory(shape, Layout(1, micro_batch=1, seq_len=3), PlanOptions(precision="bf16", fsdp=False))
    # params 2 x 212, AdamW states 4 x 212; 3 tokens x (172 layer + 24 final norm) saved; CE buffers 12 x 10 x 3
    assert memory.phase == "loss"
    assert memory.components["params"] == 424
    assert memory.components["optimizer"] == 848
    assert memory.components["activations"] == 3 * (172 + 24)
    assert memory.components["loss"] == 360
    assert memory.total == 424 + 848 + 588 + 360
    # the optimizer step: params + grads (2 B) + states + foreach temporary (2 B per param)
    assert memory.phases["step"] == 212 * (2 + 2 + 4 + 2)


def test_fused_adamw_drops_the_step_temporary():
    shape = shape_from_config(HAND)
    fused = estimate_memory(shape, Layout(1, seq_len=3), PlanOptions(precision="bf16", fsdp=False, optimizer_fused=True))
    assert fused.phases["step"] == 212 * 8


def test_fp32_master_weights_cost_16_bytes_per_parameter_at_the_step():
    shape = shape_from_config(HAND)
    memory = estimate_memory(shape, Layout(1, seq_len=3), PlanOptions(precision="bf16-mixed", optimizer_fused=True))
    assert memory.phases["step"] == 212 * 16


def test_sharding_divides_resident_state_by_dp_shard_whatever_the_ep_size():
    shape = shape_from_config(load_model_config("qwen3-30b-a3b"))
    opts = PlanOptions(optimizer_fused=True)
    one = estimate_memory(shape, Layout(8, ep_size=1, dp_shard=1), opts).phases["step"]
    eight = estimate_memory(shape, Layout(8, ep_size=1, dp_shard=8), opts).phases["step"]
    eight_ep = estimate_memory(shape, Layout(8, ep_size=8, dp_shard=8), opts).phases["step"]
    assert eight == pytest.approx(one / 8)
    assert eight_ep == pytest.approx(eight)


def test_expert_parallelism_shrinks_the_gathered_fsdp_unit():
    shape = shape_from_config(load_model_config("qwen3-30b-a3b"))
    experts, rest = shape.layer_params(shape.layers[0])
    assert unit_params(shape, Layout(8, ep_size=1)) == experts + rest
    assert unit_params(shape, Layout(8, ep_size=8)) == experts / 8 + rest


def test_checkpointing_saves_less_activation_memory_in_order_full_moe_none():
    shape = shape_from_config(load_model_config("qwen3-30b-a3b", {"num_hidden_layers": 12}))
    acts = {ckpt: estimate_memory(shape, Layout(1, checkpointing=ckpt), HF_BASELINE).phases["loss"]
            for ckpt in ("none", "moe", "full")}
    assert acts["full"] < acts["moe"] < acts["none"]


def test_expert_parallel_capacity_factor_scales_routed_rows():
    moe = shape_from_config(HAND).layers[0][1]
    balanced = block_bytes(moe, ActivationContext(4, 2, capacity_factor=1.0, ep_size=2)).saved
    skewed = block_bytes(moe, ActivationContext(4, 2, capacity_factor=2.0, ep_size=2)).saved
    assert skewed - balanced == pytest.approx(8 + 16 + 32)  # one more row per token


def test_allgather_dispatch_sends_every_token_and_sizes_rows_for_every_pair_of_the_group():
    from trainer.planner.cost import alltoall_bytes

    shape = shape_from_config(load_model_config("qwen3-30b-a3b", {"num_hidden_layers": 2}))
    gathered, sorted_pairs = Layout(4, ep_size=4, dispatcher="allgather"), Layout(4, ep_size=4)
    per_pass = 4 * gathered.tokens * shape.hidden * 2 * len(shape.moe_blocks)
    assert alltoall_bytes(shape, gathered, 2) == pytest.approx(3 * per_pass)  # ep - 1 copies of each token
    assert alltoall_bytes(shape, sorted_pairs, 2) == pytest.approx(8 * 3 / 4 * per_pass)  # top-8, 3 of 4 elsewhere
    peak = {layout.dispatcher: estimate_memory(shape, layout, HF_BASELINE).phases["loss"]
            for layout in (gathered, sorted_pairs)}
    assert peak["allgather"] > peak["alltoall"]  # buffers for 4x the mean rows instead of 1.25x


def test_invalid_mesh_is_a_user_error():
    with pytest.raises(UserError, match="does not divide"):
        Layout(8, ep_size=3)
    with pytest.raises(UserError, match="checkpointing"):
        Layout(1, checkpointing="some")


# Measured on one H200 (benchmark protocol): transformers 5.17 grouped_mm, sdpa, bf16 params and AdamW states,
# seq 4096, the loop holding `outputs` through backward and step. The model must land within 3% of each.
MEASURED_HF_PEAKS = [
    ("qwen3-30b-a3b", {"num_hidden_layers": 12}, 1, 76.8),
    ("qwen3-30b-a3b", {"num_hidden_layers": 12}, 2, 79.5),
    ("qwen3-30b-a3b", {"num_hidden_layers": 12}, 4, 113.8),
    ("qwen3-30b-a3b", {"num_hidden_layers": 8}, 1, 53.5),
    ("nemotron-3-nano", {"hybrid_override_pattern": "MEME*E"}, 1, 45.8),  # with the mamba_ssm kernels
]


@pytest.mark.parametrize("model,overrides,micro_batch,measured_gib", MEASURED_HF_PEAKS)
def test_predicts_the_measured_transformers_peaks_within_3_percent(model, overrides, micro_batch, measured_gib):
    shape = shape_from_config(load_model_config(model, overrides))
    predicted = estimate_memory(shape, Layout(1, micro_batch=micro_batch, seq_len=4096), HF_BASELINE).total / GiB
    assert predicted == pytest.approx(measured_gib, rel=0.03)
