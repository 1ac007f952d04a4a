"""With tensorboard installed, every numeric metric of a step is mirrored as a TensorBoard scalar."""

from __future__ import annotations

import pytest

from trainer.metrics import MetricsWriter, read_metrics


def test_metrics_are_mirrored_to_tensorboard_scalars(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    writer = MetricsWriter(tmp_path)
    for step, loss in ((1, 2.5), (2, 2.0)):
        writer.write({"step": step, "loss": loss, "lr": 1e-4, "note": "text is not a scalar"})
    writer.close()

    assert [r["loss"] for r in read_metrics(tmp_path)] == [2.5, 2.0]
    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["loss", "lr"]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]
