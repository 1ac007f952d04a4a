"""The data of a run: its training datasets (mixed by weight), its validation set, tokenized once into the shared
cache (`trainer.data.storage`) and memory-mapped.

    data = prepare_data(recipe.data, tokenizer, seed, any_rank, local_rank)
    data.train   # samples[i], lengths, len(); a weighted mixture has epoch_order() too
    data.eval    # the validation samples, or None

With several processes, local rank 0 of each node builds what is not cached while the others wait at a collective
(`any_rank`, which also carries a builder's failure to every rank, so none waits forever), then every rank
memory-maps the same files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainer.config import DataConfig, resolve_path
from trainer.data.dataset import DatasetStats
from trainer.data.mixing import MixedDataset
from trainer.data.storage import OpenedSource, SampleView, Settings, Source, TokenStore, build, cache_key, \
    default_cache_dir, is_built
from trainer.errors import UserError


@dataclass
class PreparedData:
    train: object
    eval: object | None
    stats: DatasetStats  # of the training datasets, before the validation split
    sources: list[Source]
    built: list[str] = field(default_factory=list)  # the datasets tokenized by this call (the others were cached)
    cache_dir: Path | None = None

    def summary(self) -> str:
        held = f", {len(self.eval)} for validation" if self.eval is not None else ""
        mixed = (" mixed " + ":".join(f"{s.weight:g}" for s in self.sources) if len(self.sources) > 1 else "")
        cache = f"tokenized {len(self.built)} dataset(s) into" if self.built else "read from the token cache in"
        return f"{self.stats.summary()}; {len(self.train)} for training{held}{mixed}; {cache} {self.cache_dir}"


def sources_of(data: DataConfig) -> list[Source]:
    """The training datasets of the recipe: data.sources, or data.train_path with data.format/columns/split."""
    if not data.sources:
        return [Source(resolve_path(data.train_path), 1.0, data.format, dict(data.columns), data.split)]
    return [Source(resolve_path(s["path"]), float(s.get("weight", 1.0)), s.get("format", data.format),
                   dict(s.get("columns", data.columns)), s.get("split", data.split)) for s in data.sources]


def prepare_data(data: DataConfig, tokenizer, seed: int = 0, any_rank=None, local_rank: int = 0) -> PreparedData:
    root = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    settings = Settings(data.seq_len, data.long_samples, data.packing)
    sources, built = sources_of(data), []
    stores = [_store(s, tokenizer, settings, root, data.num_proc, any_rank, local_rank, built) for s in sources]
    stats = DatasetStats()
    for store in stores:
        for name in vars(stats):
            setattr(stats, name, getattr(stats, name) + getattr(store.stats, name))
    train_parts, eval_parts = [], []
    for i, store in enumerate(stores):
        if not len(store):
            continue
        if data.eval_fraction:
            train_idx, eval_idx = _held_out(len(store), data.eval_fraction, seed, i)
            train_parts.append((SampleView(store, train_idx), sources[i].weight))
            eval_parts.append(SampleView(store, eval_idx))
        else:
            train_parts.append((SampleView(store, np.arange(len(store))), sources[i].weight))
    if data.eval_path:
        source = Source(resolve_path(data.eval_path), 1.0, data.format, dict(data.columns), data.split)
        store = _store(source, tokenizer, settings, root, data.num_proc, any_rank, local_rank, built)
        if not len(store):
            raise UserError(f"no validation samples in {data.eval_path} ({store.stats.summary()})",
                            "check data.format, or raise data.seq_len / use data.long_samples=truncate")
        eval_parts.append(SampleView(store, np.arange(len(store))))
    if not train_parts or not sum(len(p) for p, _ in train_parts):
        where = ", ".join(s.path for s in sources)
        raise UserError(f"no trainable samples in {where} ({stats.summary()})",
                        "check data.format, or raise data.seq_len / use data.long_samples=truncate")
    train = train_parts[0][0] if len(train_parts) == 1 else MixedDataset(*zip(*train_parts))
    evaluation = None
    if eval_parts:
        evaluation = eval_parts[0] if len(eval_parts) == 1 else MixedDataset(eval_parts, [len(p) for p in eval_parts])
    return PreparedData(train, evaluation, stats, sources, built, root)


def _store(source: Source, tokenizer, settings: Settings, root: Path, num_proc: int, any_rank, local_rank: int,
           built: list) -> TokenStore:
    opened = OpenedSource(source)
    cache = root / cache_key(opened, tokenizer, settings)
    error = None
    if local_rank == 0 and not is_built(cache):
        try:
            build(opened, tokenizer, settings, cache, num_proc)
            built.append(source.path)
        except UserError as err:
            error = err
    if any_rank is not None and any_rank(1 if error else 0) and error is None:
        raise UserError(f"tokenizing {source.path} failed on another rank", "see that rank's error above")
    if error is not None:
        raise error
    return TokenStore(cache)


def _held_out(n: int, fraction: float, seed: int, which: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: a seeded `fraction` of n (at least one) held out, both in the stored order."""
    if n < 2:
        raise UserError(f"data.eval_fraction={fraction:g} needs at least 2 samples to split, dataset {which} has {n}",
                        "add data, or give a validation file with data.eval_path")
    order = np.random.default_rng([seed, 104729, which]).permutation(n)
    k = min(n - 1, max(1, round(fraction * n)))
    return np.sort(order[k:]), np.sort(order[:k])
