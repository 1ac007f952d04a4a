"""Lay samples out as fixed-shape sequences: several samples per row (packing) or one sample per row (padding).

A row is described by three [S] lists: `input_ids`, `targets` (already shifted, -100 = no loss) and `position_ids`.
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
    input_ids: list[int] = field(default_factory=list)
    targets: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    num_samples: int = 0

    def add(self, sample: TokenizedSample) -> None:
        self.input_ids += sample.input_ids
        self.targets += sample.targets()
        self.position_ids += list(range(len(sample)))
        self.num_samples += 1

    def pad_to(self, length: int, pad_id: int) -> None:
        missing = length - len(self.input_ids)
        self.input_ids += [pad_id] * missing
        self.targets += [IGNORE_INDEX] * missing
        self.position_ids += list(range(missing))


def collate(rows: list[Row], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Stack rows padded to `length` -> {"input_ids", "targets", "position_ids"}: LongTensor [B, length] each."""
    for row in rows:
        row.pad_to(length, pad_id)
    # through numpy: several times faster than torch.tensor on nested lists, the same LongTensors
    return {
        "input_ids": torch.from_numpy(np.array([r.input_ids for r in rows], dtype=np.int64)),
        "targets": torch.from_numpy(np.array([r.targets for r in rows], dtype=np.int64)),
        "position_ids": torch.from_numpy(np.array([r.position_ids for r in rows], dtype=np.int64)),
    }
