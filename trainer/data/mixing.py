"""Several datasets in one stream, by weight.

Each epoch of the mixture has as many samples as the datasets together; dataset i contributes
`round(N * w_i / sum(w))` of them, taken from its own seeded permutation for that epoch (cycled when the weight asks
for more than it holds, a different subset each epoch when less). The samples are then interleaved evenly: sample k
of dataset i (of c_i) sits at the key (k + u) / c_i, u uniform in [0, 1), and the epoch is the keys' sort order. Every
window of the stream, not only the whole epoch, then holds each dataset at its share (to within one sample), and
the order is a pure function of (seed, epoch), so the loader's resumable position stays `{"epoch", "cursor"}`.
"""

from __future__ import annotations

import numpy as np

from trainer.errors import UserError

SOURCE_KEYS = ("path", "weight", "format", "columns", "split")


def check_sources(sources: list[dict]) -> None:
    """One-line UserError for a data.sources entry without a path, with an unknown key or a bad weight."""
    for i, source in enumerate(sources):
        unknown = sorted(set(source) - set(SOURCE_KEYS))
        if unknown:
            raise UserError(f"data.sources[{i}] has the unknown key '{unknown[0]}'",
                            f"use the keys {', '.join(SOURCE_KEYS)}")
        if not isinstance(source.get("path"), str) or not source["path"].strip():
            raise UserError(f"data.sources[{i}] has no path", "write it like {path: data.jsonl, weight: 1}")
        weight = source.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or weight == float("inf"):
            raise UserError(f"data.sources[{i}].weight must be a number > 0, got {weight!r}",
                            f"set data.sources[{i}].weight=1")


class MixedDataset:
    """Datasets (each with `samples[i]`, `lengths` [n_i] and `__len__`) behind one index space, mixed by weight.

    `samples[j]` is sample j of the concatenation; `epoch_order(epoch, seed, shuffle)` the indices of one mixture
    epoch; `lengths` [sum n_i] the tokens of each sample."""

    def __init__(self, parts: list, weights: list[float]):
        self.parts, self.weights = parts, [float(w) for w in weights]
        sizes = np.array([len(p) for p in parts], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.lengths = np.concatenate([np.asarray(p.lengths) for p in parts])
        total = float(sum(self.weights))
        self.counts = [max(1, round(int(sizes.sum()) * w / total)) for w in self.weights]
        self.samples = self

    def __len__(self) -> int:
        return int(self.starts[-1])

    def epoch_size(self) -> int:
        return int(sum(self.counts))

    def __getitem__(self, index: int):
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part].samples[int(index - self.starts[part])]

    def epoch_order(self, epoch: int, seed: int, shuffle: bool = True) -> list[int]:
        """Global sample indices of mixture epoch `epoch` (see the module docstring)."""
        rng = np.random.default_rng([seed, epoch, 7919])
        indices, keys = [], []
        for i, (part, count) in enumerate(zip(self.parts, self.counts)):
            n = len(part)
            own = rng.permutation(n) if shuffle else np.arange(n)
            taken = np.resize(own, count)  # cycled when the weight asks for more samples than the dataset holds
            indices.append(taken + self.starts[i])
            jitter = rng.random(count) if shuffle else np.full(count, 0.5)
            keys.append((np.arange(count) + jitter) / count)
        order = np.argsort(np.concatenate(keys), kind="stable")
        return np.concatenate(indices)[order].tolist()
