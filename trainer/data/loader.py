"""A deterministic, resumable stream of micro-batches over a dataset (an SFTDataset, a memory-mapped store or a
weighted mixture, `trainer.data.storage` / `trainer.data.mixing`).

The stream is a pure function of (seed, epoch, cursor): each epoch visits the samples in a seeded permutation,
and rows are filled greedily in that order. The loader's whole position is therefore `{"epoch", "cursor"}`
(the next sample to place), which `state_dict()` returns and a checkpoint stores; resuming replays nothing and
skips nothing. Data-parallel ranks read the same stream and keep every `dp_world_size`-th micro-batch.
"""

from __future__ import annotations

import torch

from trainer.data.packing import Row, collate


class StatefulLoader:
    """Yields {"input_ids", "targets", "position_ids"}: LongTensor [micro_batch_size, S] (S = seq_len if packing)."""

    def __init__(
        self, dataset, seq_len: int, micro_batch_size: int, pad_id: int, packing: bool = True,
        shuffle: bool = True, seed: int = 0, dp_rank: int = 0, dp_world_size: int = 1,
    ):
        self.dataset, self.seq_len, self.micro_batch_size, self.pad_id = dataset, seq_len, micro_batch_size, pad_id
        self.packing, self.shuffle, self.seed = packing, shuffle, seed
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        for _ in range(self.dp_rank):  # micro-batches that belong to the ranks before this one
            self._skip_micro_batch()
        batch = self._next_micro_batch()
        for _ in range(self.dp_world_size - self.dp_rank - 1):
            self._skip_micro_batch()
        return batch

    def _skip_micro_batch(self) -> None:
        """Advance past another rank's micro-batch: positions only, no tokens copied."""
        for _ in range(self.micro_batch_size):
            self.next_row_indices()

    def _next_micro_batch(self) -> dict[str, torch.Tensor]:
        rows = [self._next_row() for _ in range(self.micro_batch_size)]
        length = self.seq_len if self.packing else max(r.length for r in rows)
        batch = collate(rows, length, self.pad_id)
        batch["num_samples"] = torch.tensor(sum(r.num_samples for r in rows))
        return batch

    def _next_row(self) -> Row:
        row = Row()
        for index in self.next_row_indices():
            row.add(self.dataset.samples[index])
        return row

    def next_row_indices(self) -> list[int]:
        """The samples of the next row (advancing the position); decided by sample lengths alone."""
        taken, used = [], 0
        while True:
            order = self._epoch_order()
            if self.cursor >= len(order):  # epoch done: a partly filled row closes here, so epochs never mix
                self.epoch, self.cursor = self.epoch + 1, 0
                if taken:
                    return taken
                continue
            index = order[self.cursor]
            length = self._length(index)
            if taken and used + length > self.seq_len:
                return taken
            taken.append(index)
            used += length
            self.cursor += 1
            if not self.packing:
                return taken

    def _length(self, index: int) -> int:
        lengths = getattr(self.dataset, "lengths", None)
        return int(lengths[index]) if lengths is not None else len(self.dataset.samples[index])

    def _epoch_order(self) -> list[int]:
        if self._order_epoch != self.epoch:
            n = len(self.dataset)
            if hasattr(self.dataset, "epoch_order"):  # several datasets mixed by weight (trainer.data.mixing)
                self._order = self.dataset.epoch_order(self.epoch, self.seed, self.shuffle)
            elif self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
                self._order = torch.randperm(n, generator=generator).tolist()
            else:
                self._order = list(range(n))
            self._order_epoch = self.epoch
        return self._order
