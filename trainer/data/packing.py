"""Lay samples out as fixed-shape sequences: several samples per row (packing) or one sample per row (padding).

A row is laid out as three [S] arrays: `input_ids`, `targets` (already shifted, -100 = no loss) and `position_ids`.
Positions restart at 0 for every sample and for the padding tail, so no token attends across samples: transformers
(v5) detects the restarts in `position_ids` and builds a block-diagonal causal mask (sdpa/eager) or uses
varlen kernels (flash attention). Padding needs no attention mask either: it sits after the sample and attention
is causal, so the sample never sees it, and its targets are -100.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.data.render import IGNORE_INDEX, TokenizedSample


@dataclass
class Row:
    """The samples of one sequence, as (input_ids [n], targets [n]) int64 arrays, laid out by `collate`."""

    parts: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    length: int = 0  # tokens so far
    num_samples: int = 0

    def add(self, sample: TokenizedSample) -> None:
        ids_n, targets_n = sample.arrays()
        self.parts.append((ids_n, targets_n))
        self.length += len(ids_n)
        self.num_samples += 1


def collate(rows: list[Row], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Rows padded to `length` -> {"input_ids", "targets", "position_ids"}: LongTensor [B, length] each."""
    ids_BS = np.full((len(rows), length), pad_id, dtype=np.int64)
    targets_BS = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
    positions_BS = np.empty((len(rows), length), dtype=np.int64)
    count = np.arange(length, dtype=np.int64)
    for b, row in enumerate(rows):
        at = 0
        for ids_n, targets_n in row.parts:
            n = len(ids_n)
            ids_BS[b, at:at + n], targets_BS[b, at:at + n], positions_BS[b, at:at + n] = ids_n, targets_n, count[:n]
            at += n
        positions_BS[b, at:] = count[:length - at]  # the padding tail restarts at 0 too
    return {"input_ids": torch.from_numpy(ids_BS), "targets": torch.from_numpy(targets_BS),
            "position_ids": torch.from_numpy(positions_BS)}
