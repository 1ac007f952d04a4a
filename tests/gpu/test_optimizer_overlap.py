"""On a GPU: AdamW stepped in backward on a side stream (`perf.optimizer=overlap`; with `defer=head` / `defer=1` the
output head's and the last layer's updates run on it under the next forward instead; with `step_priority=high` the
steps run on a high-priority stream above it) gives bit-identical parameters and losses to the same updates on the
compute stream (`optimizer=in-backward`): only the stream and the moment differ, not the arithmetic. The same holds
after the backward: with clipping, `defer=2` / `defer=all` run the updates on a side stream under the next forward,
bit-identical to `optimizer=after-backward` updating in the step; and `grad_norm=in-backward` (each gradient's norm on a
side stream during the backward) gives the norm of the pass after it.

Run: `pytest -m gpu tests/gpu/test_optimizer_overlap.py`. Tolerance: exact (torch.equal) over 4 steps, fp32 and bf16.
"""

from __future__ import annotations

import pytest
import torch

from gpu_training import train_tiny_moe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


OVERLAP = ("optimizer=overlap",)


def _name(spec: tuple[str, ...]) -> str:
    return "+".join(spec)


def _trains_like_in_stream_updates(spec: tuple[str, ...], dtype: torch.dtype = torch.bfloat16,
                                   reference_spec: tuple[str, ...] = ("optimizer=in-backward",),
                                   max_grad_norm: float = 0.0):
    """4 steps of `spec` and of the in-stream reference `reference_spec`: bit-identical losses and parameters.
    Returns (model, optimizer) of `spec`."""
    reference, reference_losses, _, _ = train_tiny_moe(reference_spec, steps=4, batch=4, dtype=dtype, apply=False,
                                                       max_grad_norm=max_grad_norm)
    model, losses, optimizer, _ = train_tiny_moe(spec, steps=4, batch=4, dtype=dtype, apply=False,
                                                 max_grad_norm=max_grad_norm)
    assert losses == reference_losses
    for (name, a), (_, b) in zip(reference.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), name
    return model, optimizer


@pytest.mark.parametrize("spec", [OVERLAP, OVERLAP + ("defer=head",), OVERLAP + ("defer=1",),
                                  OVERLAP + ("step_priority=high",)], ids=_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_side_stream_updates_equal_in_stream_updates(dtype, spec):
    overlapped, optimizer = _trains_like_in_stream_updates(spec, dtype)
    assert optimizer._side_stream is not None
    for name, p in overlapped.named_parameters():
        assert p.grad is None, name


@pytest.mark.parametrize("spec", [OVERLAP, OVERLAP + ("defer=2",), OVERLAP + ("defer=2", "step_priority=high")],
                         ids=_name)
def test_side_stream_updates_survive_a_slow_side_stream(monkeypatch, spec):
    """Every update on the side stream starts ~10 ms late (a sleep kernel queued before it), so any tensor it reads
    that the compute stream may free and reuse meanwhile (gradients, the step counters' copies) would be
    overwritten before it is read: still bit-identical to the in-stream updates."""
    from trainer.optim import AdamW

    update = AdamW._update

    def late_update(self, *args, **kwargs):
        if self._side_stream is not None:  # the in-stream reference runs unchanged
            torch.cuda._sleep(20_000_000)  # on the current (side) stream: delays this update, not the compute stream
        return update(self, *args, **kwargs)

    monkeypatch.setattr(AdamW, "_update", late_update)
    _trains_like_in_stream_updates(spec)


AFTER = ("optimizer=after-backward",)


@pytest.mark.parametrize("defer", ["2", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_updates_held_back_after_the_backward_equal_the_updates_in_the_step(dtype, defer):
    """AdamW after the backward with clipping at 0.1 (every step clips): the held-back updates, on the side stream
    under the next forward with the step's clipping divisor, skip flag and learning rate, equal the step's own."""
    _, optimizer = _trains_like_in_stream_updates(AFTER + (f"defer={defer}",), dtype, AFTER, max_grad_norm=0.1)
    assert optimizer._side_stream is not None


def test_updates_held_back_after_the_backward_survive_a_slow_side_stream(monkeypatch):
    """As `test_side_stream_updates_survive_a_slow_side_stream`, for every layer held back after the backward: the
    gradients, the step's clipping divisor and skip flag must outlive the step that made them."""
    from trainer.optim import AdamW

    update = AdamW._update

    def late_update(self, *args, **kwargs):
        if self._side_stream is not None:
            torch.cuda._sleep(20_000_000)
        return update(self, *args, **kwargs)

    monkeypatch.setattr(AdamW, "_update", late_update)
    _trains_like_in_stream_updates(AFTER + ("defer=all",), torch.bfloat16, AFTER, max_grad_norm=0.1)


@pytest.mark.parametrize("extra", [(), ("defer=all",)], ids=_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_norm_in_the_backward_equals_the_norm_after_it(dtype, extra):
    """`grad_norm=in-backward` (each gradient's norm on a side stream as it completes) against the pass after the
    backward, clipping at 0.1 on every step: the same norms, so bit-identical losses and parameters."""
    _trains_like_in_stream_updates(AFTER + ("grad_norm=in-backward",) + extra, dtype,
                                   AFTER + ("grad_norm=after-backward",) + extra, max_grad_norm=0.1)


def test_gradient_norm_in_the_backward_survives_a_slow_side_stream(monkeypatch):
    """Every norm on the side stream starts ~10 ms late: the gradients it reads must still be the step's."""
    from trainer.parallel.grad_norm import GradNormInBackward

    on_final_grad = GradNormInBackward._on_final_grad

    def late(self, param):
        if self._armed and self._stream is not None:
            with torch.cuda.stream(self._stream):
                torch.cuda._sleep(20_000_000)
        return on_final_grad(self, param)

    monkeypatch.setattr(GradNormInBackward, "_on_final_grad", late)
    _trains_like_in_stream_updates(AFTER + ("grad_norm=in-backward", "defer=all"), torch.bfloat16,
                                   AFTER + ("grad_norm=after-backward", "defer=all"), max_grad_norm=0.1)
