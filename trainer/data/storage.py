"""Tokenized datasets on disk: built once, memory-mapped by every rank and every later run.

    source (JSONL / Parquet / Arrow file, save_to_disk directory, Hub name)
      -> records, in shards over `num_proc` processes -> render (trainer.data.render) -> length rule
      -> Arrow files <cache>/<key>/shard-*.arrow (input_ids int32, loss_mask int8, length) + info.json
      -> `datasets.Dataset.from_file` (memory-mapped) -> TokenStore (samples by index, without copies)

The key hashes everything the token ids depend on: the source's identity (resolved path, size and modification time
of every file, or the Hub dataset's fingerprint), the tokenizer's vocabulary and chat template, the schema and column
mapping, seq_len, the long-sample rule and packing. A cache is built in a temporary directory and renamed into place
when complete, so a killed build is never read; two builders racing (several nodes on one shared file system)
both succeed and one copy stays. JSONL is read by the trainer's own reader (errors name the file and line, a
repeated key is refused); other forms through the `datasets` library (Hub names respect HF_HUB_OFFLINE).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from trainer.data.dataset import DatasetStats
from trainer.data.render import IGNORE_INDEX, TokenizedSample, render_record
from trainer.data.sources import iter_jsonl
from trainer.errors import UserError

FORMAT_VERSION = 1  # bump when the rendering or the file layout changes: every cache is then rebuilt
BATCH = 1024  # records per Arrow record batch
INLINE_BYTES = 8 * 2**20  # JSONL smaller than this (or tables under INLINE_ROWS) tokenize in the trainer itself
INLINE_ROWS = 20_000
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class Source:
    path: str  # as the user wrote it (builtin: resolved)
    weight: float = 1.0
    format: str = "auto"
    columns: dict = field(default_factory=dict)
    split: str = "train"

    def __hash__(self):
        return hash((self.path, self.weight, self.format, json.dumps(self.columns, sort_keys=True), self.split))


@dataclass(frozen=True)
class Settings:
    """What tokenization depends on besides the source."""

    seq_len: int
    long_samples: str = "truncate"
    packing: bool = True


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOE_DATA_CACHE") or Path.home() / ".cache" / "moe-stack" / "data")


class OpenedSource:
    """A source ready to be read in shards: a JSONL file (`file`) or a `datasets.Dataset` (`table`)."""

    def __init__(self, source: Source):
        self.source = source
        self.file: Path | None = None
        self.table = None
        path = Path(source.path)
        if path.is_file() and path.suffix in JSONL_SUFFIXES:
            self.file = path
        elif path.is_file() and path.suffix in (".parquet", ".arrow"):
            self.table = _load_table(path)
        elif path.is_dir():
            self.table = _load_from_disk(path, source.split)
        elif path.suffix in JSONL_SUFFIXES + (".parquet", ".arrow") or source.path.startswith((".", "/", "~")):
            raise UserError(f"data file {source.path} does not exist",
                            "set data.train_path to a JSONL or Parquet file")
        elif path.is_file():
            raise UserError(f"data file {source.path} is neither JSONL, Parquet nor Arrow (by its suffix)",
                            "name it .jsonl, .parquet or .arrow, or convert it")
        else:
            self.table = _load_from_hub(source.path, source.split)

    def identity(self) -> dict:
        if self.file is not None:
            return _file_identity(self.file)
        return {"fingerprint": getattr(self.table, "_fingerprint", None), "rows": len(self.table)}

    def where(self, row: int) -> str:
        return f"{self.source.path}:row {row + 1}"

    def shards(self, count: int) -> list[tuple[int, int, int]]:
        """(start, stop, first line) pieces: byte ranges of the JSONL file on line starts, or row ranges."""
        if self.file is not None:
            return _line_ranges(self.file, count)
        rows = len(self.table)
        bounds = np.linspace(0, rows, count + 1).astype(int)
        return [(int(a), int(b), 0) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def records(self, start: int, stop: int, first_line: int):
        if self.file is not None:
            for record, _ in iter_jsonl(self.file, start, stop, first_line):
                yield record
            return
        table = self.table.with_format("arrow")
        for begin in range(start, stop, BATCH):
            rows = table[begin:min(stop, begin + BATCH)].to_pylist()
            for offset, record in enumerate(rows):
                record["_source"] = self.where(begin + offset)
                yield record

    def size_hint(self) -> bool:
        """True when the source is small enough to tokenize without worker processes."""
        if self.file is not None:
            return self.file.stat().st_size < INLINE_BYTES
        return len(self.table) < INLINE_ROWS


def cache_key(opened: OpenedSource, tokenizer, settings: Settings) -> str:
    source = opened.source
    parts = {
        "version": FORMAT_VERSION, "source": opened.identity(), "format": source.format,
        "columns": source.columns, "settings": asdict(settings), "tokenizer": tokenizer_identity(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tokenizer_identity(tokenizer) -> str:
    """A hash of the vocabulary, merges, normalizer, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = [str(getattr(tokenizer, "chat_template", None)), str(tokenizer.eos_token_id), str(tokenizer.bos_token_id),
             type(tokenizer).__name__]
    return hashlib.sha256("\0".join([text, *extra]).encode()).hexdigest()


def is_built(cache: Path) -> bool:
    return (cache / "info.json").is_file()


def build(opened: OpenedSource, tokenizer, settings: Settings, cache: Path, num_proc: int) -> None:
    """Tokenize `opened` into the directory `cache` (through a temporary and a rename; see the module docstring)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.parent / f".tmp-{cache.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        procs = 1 if opened.size_hint() else (num_proc or auto_num_proc())
        pieces = opened.shards(1 if procs == 1 else procs * 4)
        tasks = [(i, start, stop, line, str(tmp / f"shard-{i:05d}.arrow")) for i, (start, stop, line) in
                 enumerate(pieces)]
        if procs == 1:
            _init_worker(opened, tokenizer, settings)
            results = [_tokenize_shard(task) for task in tasks]
        else:
            results = _run_pool(procs, tasks, opened, tokenizer, settings)
        stats = DatasetStats()
        for result in results:
            for name, value in result["stats"].items():
                setattr(stats, name, getattr(stats, name) + value)
        if stats.records == 0:
            raise UserError(f"data file {opened.source.path} holds no records", "add at least one example to it")
        shards = [Path(r["path"]).name for r in results if r["samples"]]
        info = {"source": opened.source.path, "stats": asdict(stats), "shards": shards, "version": FORMAT_VERSION}
        (tmp / "info.json").write_text(json.dumps(info, indent=1))
        try:
            os.rename(tmp, cache)
        except OSError:  # another builder finished first: its copy is the same
            if not is_built(cache):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def auto_num_proc() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _run_pool(procs: int, tasks: list, opened, tokenizer, settings) -> list[dict]:
    import multiprocessing

    # tokenizers' own threads would compete with the worker processes (and warn after the fork)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(procs, _init_worker, (opened, tokenizer, settings)) as pool:
        return pool.map(_tokenize_shard, tasks, chunksize=1)


_WORKER: dict = {}


def _init_worker(opened, tokenizer, settings) -> None:
    _WORKER.update(opened=opened, tokenizer=tokenizer, settings=settings)


def _tokenize_shard(task) -> dict:
    """Render the records of one piece into one Arrow file; returns its path, sample count and DatasetStats."""
    import pyarrow as pa

    _, start, stop, first_line, out = task
    opened, tokenizer, settings = _WORKER["opened"], _WORKER["tokenizer"], _WORKER["settings"]
    source = opened.source
    stats = DatasetStats()
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
                        ("length", pa.int32())])
    ids, masks, samples = [], [], 0
    with pa.OSFile(out, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        def flush():
            if ids:
                lengths = np.fromiter((len(x) for x in ids), np.int32, len(ids))
                offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
                flat_ids = pa.array(np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum())))
                flat_mask = pa.array(np.frombuffer(b"".join(bytes(m) for m in masks), np.int8))
                writer.write_batch(pa.record_batch([pa.ListArray.from_arrays(offsets, flat_ids),
                                                    pa.ListArray.from_arrays(offsets, flat_mask),
                                                    pa.array(lengths)], schema=schema))
                ids.clear()
                masks.clear()

        for record in _readable(opened.records(start, stop, first_line), source.path):
            stats.records += 1
            sample = render_record(record, tokenizer, source.format, source.columns or None)
            if len(sample) > settings.seq_len:
                if settings.long_samples == "drop":
                    stats.dropped_long += 1
                    continue
                stats.truncated += 1
                sample = TokenizedSample(sample.input_ids[:settings.seq_len], sample.loss_mask[:settings.seq_len])
            trained = sum(sample.loss_mask[1:])  # the first token is never a target: nothing precedes it
            if not trained:
                stats.dropped_no_target += 1
                continue
            ids.append(sample.input_ids)
            masks.append(sample.loss_mask)
            samples += 1
            stats.tokens += len(sample)
            stats.target_tokens += trained
            if len(ids) >= BATCH:
                flush()
        flush()
    stats.samples = samples
    return {"path": out, "samples": samples, "stats": asdict(stats)}


def _readable(records, path: str):
    try:
        yield from records
    except OSError as err:  # permissions, a vanished mount, an I/O error
        raise UserError(f"cannot read data file {path} ({err.strerror or err})",
                        "check its permissions, or copy it to a readable location") from None


class TokenStore:
    """The samples of one built cache, memory-mapped: `samples[i]` -> TokenizedSample, `lengths` [n] int32.

    The Arrow files are opened through `datasets.Dataset.from_file`; samples are sliced from the column buffers
    (numpy views of the mapped files), so a rank's resident memory is the pages it touches, shared with every other
    rank on the node."""

    def __init__(self, cache: Path):
        from datasets import Dataset, concatenate_datasets

        self.cache = cache
        self.info = json.loads((cache / "info.json").read_text())
        self.stats = DatasetStats(**self.info["stats"])
        parts = [Dataset.from_file(str(cache / name)) for name in self.info["shards"]]
        self.dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0] if parts else None
        self._ids, self._masks, self._offsets, starts = [], [], [], [0]
        for part in parts:
            table = part.data.table
            for ids, masks in zip(table.column("input_ids").chunks, table.column("loss_mask").chunks):
                self._ids.append(ids.values.to_numpy(zero_copy_only=True))
                self._masks.append(masks.values.to_numpy(zero_copy_only=True))
                self._offsets.append(ids.offsets.to_numpy(zero_copy_only=True))
                starts.append(starts[-1] + len(ids))
        self._starts = np.asarray(starts, dtype=np.int64)
        self.lengths = (np.concatenate([np.diff(o) for o in self._offsets]).astype(np.int32) if self._offsets
                        else np.zeros(0, np.int32))
        self.samples = self

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> TokenizedSample:
        chunk = int(np.searchsorted(self._starts, index, side="right")) - 1
        local = int(index - self._starts[chunk])
        begin, end = self._offsets[chunk][local], self._offsets[chunk][local + 1]
        return StoredSample(self._ids[chunk][begin:end], self._masks[chunk][begin:end])


class StoredSample(TokenizedSample):
    """A sample read from the store: numpy views into the mapped files; lists only when asked for."""

    def __init__(self, ids_n: np.ndarray, mask_n: np.ndarray):
        self._ids_n, self._mask_n = ids_n, mask_n

    @property
    def input_ids(self) -> list[int]:
        return self._ids_n.tolist()

    @property
    def loss_mask(self) -> list[int]:
        return self._mask_n.tolist()

    def __len__(self) -> int:
        return len(self._ids_n)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        targets_n = np.full(len(self._ids_n), IGNORE_INDEX, dtype=np.int64)
        targets_n[:-1] = np.where(self._mask_n[1:] != 0, self._ids_n[1:], IGNORE_INDEX)
        return self._ids_n.astype(np.int64), targets_n

    def targets(self) -> list[int]:
        return self.arrays()[1].tolist()


class SampleView:
    """Some samples of a store (a train or a held-out subset), in the given order: `samples[i]`, `lengths`."""

    def __init__(self, store: TokenStore, indices: np.ndarray):
        self.store, self.indices = store, np.asarray(indices, dtype=np.int64)
        self.lengths = store.lengths[self.indices]
        self.samples = self

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> TokenizedSample:
        return self.store[int(self.indices[index])]


def _file_identity(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _line_ranges(file: Path, count: int) -> list[tuple[int, int, int]]:
    """`count` byte ranges of `file` that start on line starts, with the line number each starts at."""
    size = file.stat().st_size
    try:
        starts = [0]
        with open(file, "rb") as f:
            for k in range(1, count):
                f.seek(max(size * k // count, starts[-1]))
                if f.tell() > 0:
                    f.readline()
                starts.append(min(f.tell(), size))
            ranges, line, previous = [], 1, 0
            for a, b in zip(starts, starts[1:] + [size]):
                f.seek(previous)
                line += _count_newlines(f, a - previous)
                previous = a
                if b > a:
                    ranges.append((a, b, line))
    except OSError as err:
        raise UserError(f"cannot read data file {file} ({err.strerror or err})",
                        "check its permissions, or copy it to a readable location") from None
    return ranges or [(0, 0, 1)]


def _count_newlines(f, nbytes: int) -> int:
    count = 0
    while nbytes > 0:
        block = f.read(min(nbytes, 1 << 24))
        if not block:
            break
        count += block.count(b"\n")
        nbytes -= len(block)
    return count


def _load_table(path: Path):
    import datasets

    try:
        if path.suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        return datasets.Dataset.from_parquet(str(path))
    except Exception as err:  # pyarrow and datasets raise several types for corrupt files
        raise UserError(f"{path} is not a readable {path.suffix[1:].capitalize()} file ({_first_line(err)})",
                        "re-export it or convert to JSONL") from None


def _load_from_disk(path: Path, split: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"data directory {path} is not a datasets save_to_disk directory ({_first_line(err)})",
                        "point at a JSONL/Parquet/Arrow file or a directory written by Dataset.save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"data directory {path} has no split '{split}' (splits: {', '.join(loaded)})",
                            f"set data.split to one of {', '.join(loaded)}")
        loaded = loaded[split]
    return loaded


def _load_from_hub(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE")
        fix = ("HF_HUB_OFFLINE is set: only datasets already in the Hugging Face cache load; unset it or download "
               "the dataset first" if offline else "check the name and split, the network, or give a local file")
        raise UserError(f"cannot load the dataset '{name}' (split {split}) from the Hugging Face Hub "
                        f"({_first_line(err)[:160]})", fix) from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
