"""End-of-run pictures: the loss curve and the expert-load heatmap (layers x experts). Need matplotlib."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def plot_loss(records: list[dict], path: Path) -> bool:
    """loss, the validation loss where evaluated, and lr on a second axis, against step -> PNG; False when
    matplotlib is missing."""
    plt = _pyplot()
    points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if plt is None or not points:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s for s, _ in points], [loss for _, loss in points], label="train loss")
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if evals:
        ax.plot([s for s, _ in evals], [loss for _, loss in evals], "o-", color="tab:green", label="eval loss")
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in lrs], [lr for _, lr in lrs], color="tab:orange", alpha=0.5, label="lr")
        ax2.set_ylabel("lr")
    ax.set_title("training and validation loss" if evals else "training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_expert_load(counts_LE: torch.Tensor | None, path: Path) -> bool:
    """Share of routed tokens per expert, [L, E] heatmap normalised per layer (1/E = balanced) -> PNG."""
    plt = _pyplot()
    if plt is None or counts_LE is None or counts_LE.numel() == 0:
        return False
    share_LE = counts_LE / counts_LE.sum(dim=1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * share_LE.shape[1] + 2), max(3, 0.25 * share_LE.shape[0] + 1.5)))
    image = ax.imshow(share_LE.numpy(), aspect="auto", cmap="viridis")
    layers, experts = share_LE.shape
    ax.set_yticks(range(layers))
    ax.set_xticks(range(0, experts, max(1, experts // 16)))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("share of routed tokens per expert")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
