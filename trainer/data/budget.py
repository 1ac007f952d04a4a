"""How many optimizer steps a run takes when its length is given in epochs or tokens, and how many epochs a run of
so many steps covers.

Rows come from the loader's own packing rule (`StatefulLoader.next_row_indices`, lengths only, no tokens copied), so
the count is the loader's: the first epoch is packed exactly; later epochs (another order, so a few rows more or
less) are taken to pack alike. A step is `grad_accum_steps` micro-batches of `micro_batch_size` rows on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.data.loader import StatefulLoader


@dataclass
class EpochShape:
    rows: int  # rows (sequences) in one epoch
    tokens: int  # input tokens of those rows, padding included (what a step's `tokens` counts)
    rows_per_step: int  # micro_batch_size * grad_accum_steps * data-parallel ranks

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.rows / self.rows_per_step - 1e-9))

    def steps_for_tokens(self, max_tokens: int) -> int:
        tokens_per_step = self.tokens / self.rows * self.rows_per_step
        return max(1, math.ceil(max_tokens / tokens_per_step - 1e-9))

    def epochs_of(self, steps: int) -> float:
        return steps * self.rows_per_step / self.rows


def epoch_shape(dataset, seq_len: int, micro_batch_size: int, packing: bool, shuffle: bool, seed: int,
                rows_per_step: int) -> EpochShape:
    """Pack the first epoch by lengths; padded rows count as long as the longest row of their micro-batch."""
    loader = StatefulLoader(dataset, seq_len, micro_batch_size, 0, packing, shuffle, seed)
    lengths = getattr(dataset, "lengths", None)
    rows, tokens, batch = 0, 0, []
    while loader.epoch == 0 and loader.cursor < len(loader._epoch_order()):
        indices = loader.next_row_indices()
        rows += 1
        batch.append(sum(int(lengths[i]) if lengths is not None else len(dataset.samples[i]) for i in indices))
        if len(batch) == micro_batch_size:
            tokens += micro_batch_size * (seq_len if packing else max(batch))
            batch = []
    if batch:
        tokens += len(batch) * (seq_len if packing else max(batch))
    return EpochShape(rows, tokens, rows_per_step)


def run_steps(train_cfg, shape: EpochShape) -> int:
    """train.max_steps, or the steps that train.epochs / train.max_tokens take."""
    if train_cfg.epochs:
        return shape.steps_for_epochs(train_cfg.epochs)
    if train_cfg.max_tokens:
        return shape.steps_for_tokens(train_cfg.max_tokens)
    return train_cfg.max_steps
