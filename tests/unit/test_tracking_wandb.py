"""W&B, optional: offline mode logs the run's metrics into <output.dir>/wandb; enabled without the package installed,
the run is refused before it starts, in one line."""

from __future__ import annotations

import importlib.util

import pytest

from trainer.config import load_recipe
from trainer.errors import UserError
from trainer.tracking import check_wandb
from trainer.train import train


def test_enabled_without_wandb_installed_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"tracking.wandb=true needs the wandb package, which is not installed; "
                                        r"pip install wandb"):
        check_wandb(load_recipe("tiny-moe", ["tracking.wandb=true"]).tracking)


def test_offline_run_logs_train_and_eval_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    recipe = load_recipe("tiny-moe", ["data.seq_len=64", "train.micro_batch_size=2", "train.max_steps=2",
                                      "output.export=false", "data.eval_fraction=0.05", "train.eval_every=2",
                                      "tracking.wandb=true", "tracking.wandb_mode=offline", f"output.dir={run}"])
    train(recipe, progress=False)
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))  # the run's log, for a later `wandb sync`
