"""Router, permutation, grouped GEMM and aux-loss-free balancing, each against a direct reference."""

from __future__ import annotations

import torch

from trainer.moe.balance import AuxLossFreeBalancer
from trainer.moe.dispatch import LOCAL_DISPATCHER
from trainer.moe.grouped_gemm import grouped_mm
from trainer.moe.permute import make_plan
from trainer.moe.router import RouterSpec, route, router_z_loss


def test_softmax_router_picks_top_k_and_renormalises():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    weights, index = route(logits, RouterSpec(num_experts=4, top_k=2, norm_topk_prob=True))
    probs = torch.softmax(logits, -1)[0]
    assert index.tolist() == [[1, 2]]
    torch.testing.assert_close(weights[0], probs[[1, 2]] / probs[[1, 2]].sum())


def test_sigmoid_router_uses_correction_bias_for_choice_only_and_scales():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0])  # forces expert 0 into the choice
    spec = RouterSpec(num_experts=4, top_k=2, score_func="sigmoid", norm_topk_prob=False, routed_scaling_factor=2.5)
    weights, index = route(logits, spec, bias)
    assert sorted(index[0].tolist()) == [0, 3]
    expected = {0: torch.sigmoid(torch.tensor(0.0)) * 2.5, 3: torch.sigmoid(torch.tensor(3.0)) * 2.5}
    for w, i in zip(weights[0], index[0]):
        torch.testing.assert_close(w, expected[int(i)])


def test_group_limited_routing_only_picks_from_the_best_groups():
    torch.manual_seed(0)
    logits = torch.randn(64, 16)
    spec = RouterSpec(num_experts=16, top_k=4, score_func="sigmoid", n_group=4, topk_group=2)
    _, index = route(logits, spec)
    groups_used = (index // 4).unique(dim=None)
    for row in index // 4:
        assert len(set(row.tolist())) <= 2
    assert groups_used.numel() > 2  # different tokens pick different groups


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.randn(5, 8)
    torch.testing.assert_close(router_z_loss([logits]), torch.logsumexp(logits, -1).square().mean())


def test_local_dispatch_and_combine_equal_a_per_token_loop():
    torch.manual_seed(0)
    tokens, dim, experts, top_k = 11, 6, 5, 3
    x = torch.randn(tokens, dim, requires_grad=True)
    index = torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, requires_grad=True)
    scale = torch.randn(experts, 1)  # expert e multiplies its rows by scale[e]

    rows, plan = LOCAL_DISPATCHER.dispatch(x, index, experts)
    assert torch.equal(plan.tokens_per_expert_E, torch.bincount(index.flatten(), minlength=experts))
    out = LOCAL_DISPATCHER.combine(rows * scale[plan.expert_of_row_S], weights, plan)
    expected = torch.stack([sum(weights[t, k] * scale[index[t, k]] * x[t] for k in range(top_k)) for t in range(tokens)])
    torch.testing.assert_close(out, expected)

    grad = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, weights), grad)
    ex, ew = torch.autograd.grad(expected, (x, weights), grad)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)


def test_experts_without_tokens_are_skipped_safely():
    index = torch.tensor([[0], [0], [3]])
    plan = make_plan(index, 5)
    assert plan.offsets_E.tolist() == [2, 2, 2, 3, 3]


def test_grouped_mm_loop_matches_per_expert_matmuls():
    torch.manual_seed(0)
    x = torch.randn(10, 4)
    w = torch.randn(3, 4, 5)
    offsets = torch.tensor([3, 3, 10], dtype=torch.int32)
    out = grouped_mm(x, w, offsets, force_loop=True)
    torch.testing.assert_close(out[:3], x[:3] @ w[0])
    torch.testing.assert_close(out[3:], x[3:] @ w[2])


def test_aux_free_balancer_moves_bias_towards_underloaded_experts():
    router = torch.nn.Module()
    router.e_score_correction_bias = torch.nn.Buffer(torch.zeros(4))
    router.forward = lambda x: (x, None, torch.tensor([[0, 1], [0, 1], [0, 2]]))
    balancer = AuxLossFreeBalancer([router], rate=0.01)
    router(torch.zeros(1))
    balancer.step()
    # loads [3, 2, 1, 0], mean 1.5 -> expert 0,1 overloaded (bias down), 2,3 underloaded (bias up)
    torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([-0.01, -0.01, 0.01, 0.01]))
