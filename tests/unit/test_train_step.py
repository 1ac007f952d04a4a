"""trainer.step.TrainStep on the tiny Qwen3-MoE (CPU, AdamW after the backward; fp32 unless a test says otherwise):
accumulated micro-batches train like one micro-batch of all their rows, the gradient norm is taken and clipped on
the device as torch's `clip_grad_norm_` does, and a step whose loss is not finite leaves the model as it was and
says so.

The router aux loss is off (output_router_logits=False): it is averaged per micro-batch, not over tokens, so only
without it do two micro-batches compute exactly the function of one.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tiny_configs
from perf_options import perf_options
from trainer.config import OptimConfig
from trainer.data import IGNORE_INDEX
from trainer.models import MoEAutoModelForCausalLM
from trainer.optim import build_optimizer
from trainer.parallel.grad_norm import total_grad_norm
from trainer.step import TrainStep
from training_loop import micro_batch, runtime_for


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MoEAutoModelForCausalLM.from_config(tiny_configs.qwen3_moe(output_router_logits=False))
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.2)
    return model.to(dtype)


def _rows() -> dict[str, torch.Tensor]:
    """4 rows of 16 tokens; the first two start with a 10-token prompt that is not trained on, so a micro-batch of
    rows 0-1 holds 10 trained tokens and one of rows 2-3 holds 30."""
    ids = torch.randint(0, tiny_configs.VOCAB, (4, 16), generator=torch.Generator().manual_seed(1))
    batch = micro_batch(ids)
    batch["targets"][:2, :10] = IGNORE_INDEX
    return batch


def _split(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    return [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]


def _train_step(model, max_grad_norm: float = 0.0, lr: float = 1e-2) -> TrainStep:
    options = perf_options()
    optimizer = build_optimizer(model, OptimConfig(lr=lr, max_grad_norm=max_grad_norm), options)
    return TrainStep(model, optimizer, None, runtime_for(model), options, max_grad_norm)


def test_two_accumulated_micro_batches_train_like_one_of_all_their_rows():
    """The loss is the token mean over the whole step (10 + 30 trained tokens here, not the mean of the two
    micro-batches' means), so the gradients, the update and the reported loss are those of one micro-batch.

    In float64: some gradients are exactly zero in exact arithmetic (a router's weights for experts no token picked,
    after top-k renormalisation) and only rounding noise in floating point, and AdamW's first step moves any
    non-zero gradient by about lr whatever its size, so fp32 noise alone moves such weights by up to 4e-4 at lr
    1e-2. In float64 that noise is far below AdamW's eps. Tolerance: 1e-9 on the losses and on every parameter
    after 3 steps (float64 rounding of the reordered sums is about 1e-15)."""
    one, accumulated = _model(torch.float64), _model(torch.float64)
    step_one, step_accumulated = _train_step(one), _train_step(accumulated)
    batch = _rows()
    for _ in range(3):
        whole = step_one([batch]).fetch()
        halves = step_accumulated(_split(batch)).fetch()
        assert halves["tokens"] == whole["tokens"] == 4 * 16
        assert halves["loss"] == pytest.approx(whole["loss"], rel=1e-9)
        assert halves["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-9)
    for (name, p), q in zip(one.named_parameters(), accumulated.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-9, msg=name)


def test_two_accumulated_micro_batches_give_the_loss_and_gradient_norm_of_one_in_fp32():
    """The same first step in fp32: the loss and the gradient norm within 1e-6 relative (summation order only)."""
    whole = _train_step(_model())([_rows()]).fetch()
    halves = _train_step(_model())(_split(_rows())).fetch()
    assert halves["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert halves["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-6)


def test_gradients_are_clipped_on_the_device_to_max_grad_norm():
    """The reported norm is the one before clipping, equal to what torch's `clip_grad_norm_` returns for the same
    gradients (within 1e-6 relative: the same foreach norm). The clipping itself is a divisor inside the update
    kernel (no pass over the gradients, no host sync), so the update equals torch's clip_grad_norm_ followed by
    torch's fused AdamW on the same parameter groups: within 1e-6 (float64 here, see the accumulation test; the
    only difference is a division by (norm + 1e-6) / max_norm where torch multiplies by its inverse)."""
    max_grad_norm = 1e-3
    model, reference = _model(torch.float64), _model(torch.float64)
    step = _train_step(model, max_grad_norm)
    batch = _rows()

    out = step([batch])
    assert isinstance(out.grad_norm, torch.Tensor)  # still on the device: the host reads it only in fetch()
    reported = out.fetch()["grad_norm"]

    # the reference: the same token-mean cross-entropy, its gradients clipped by torch, torch's AdamW
    logits = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(),
                                             ignore_index=IGNORE_INDEX)
    loss.backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_grad_norm).item()
    assert expected > 100 * max_grad_norm  # the gradients were far above the limit
    assert reported == pytest.approx(expected, rel=1e-6)
    params = list(reference.parameters())
    torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.0},
                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                      lr=1e-2, betas=(0.9, 0.95), eps=1e-8, fused=True).step()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=name)


def test_a_step_with_a_nan_loss_is_skipped_and_reported():
    """NaN activations (from a forward hook on the final norm) make the loss and every gradient NaN: the optimizer
    skips on the device, so parameters, moments and step count stay as they were, and the step says skipped. The
    next finite step trains as usual."""
    model = _model()
    step = _train_step(model)
    batch = _rows()
    step([batch]).fetch()
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(step.optimizer.state_dict())

    handle = model.model.norm.register_forward_hook(lambda module, args, out: out * float("nan"))
    values = step([batch]).fetch()
    handle.remove()
    assert values["skipped"] is True
    assert values["loss"] != values["loss"]  # NaN
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    after = step.optimizer.state_dict()
    for index, s in state["state"].items():
        assert float(after["state"][index]["step"]) == float(s["step"]) == 1.0
        assert torch.equal(after["state"][index]["exp_avg"], s["exp_avg"])
        assert torch.equal(after["state"][index]["exp_avg_sq"], s["exp_avg_sq"])

    values = step([batch]).fetch()
    assert values["skipped"] is False and values["loss"] == values["loss"]
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
