"""Read SFT records from local JSONL or Parquet files, with errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.errors import UserError


def read_records(path: str) -> list[dict]:
    """All records of a `.jsonl`/`.json` (one JSON object per line) or `.parquet` file, in file order."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"data file {path} does not exist", "set data.train_path to a JSONL or Parquet file")
    try:
        records = _read_parquet(file) if file.suffix == ".parquet" else _read_jsonl(file)
    except OSError as err:  # permissions, a vanished mount, an I/O error
        raise UserError(f"cannot read data file {path} ({err.strerror or err})",
                        "check its permissions, or copy it to a readable location") from None
    if not records:
        raise UserError(f"data file {path} holds no records", "add at least one example to it")
    return records


def _read_jsonl(file: Path) -> list[dict]:
    return [record for record, _ in iter_jsonl(file)]


def iter_jsonl(file: Path, start: int = 0, stop: int | None = None, first_line: int = 1):
    """(record, "file:line") for each non-blank line whose first byte lies in [start, stop); `start` must be a line
    start and `first_line` its line number. The record carries its "_source" too. One-line UserError for a line
    that is not UTF-8, not JSON, not an object, repeats a key or nests too deeply."""
    with open(file, "rb") as f:
        f.seek(start)
        position, line_number = start, first_line
        for raw in f:
            if stop is not None and position >= stop:
                break
            position += len(raw)
            record = parse_line(file, line_number, raw)
            if record is not None:
                yield record, record["_source"]
            line_number += 1


def parse_line(file: Path, line_number: int, raw: bytes) -> dict | None:
    """One JSONL line as a dict (None for a blank line), or a UserError naming file and line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{file}:{line_number} is not UTF-8 text", "re-save the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise UserError(f"{file}:{line_number} is not valid JSON ({err.msg})", "fix or remove that line") from None
    except _DuplicateKey as err:
        raise UserError(f"{file}:{line_number} repeats the key '{err.key}'",
                        "keep one of them (JSON readers disagree on which one wins)") from None
    except RecursionError:
        raise UserError(f"{file}:{line_number} nests too deeply to read",
                        "a record is one flat object of messages or prompt/completion") from None
    if not isinstance(record, dict):
        raise UserError(f"{file}:{line_number} is not a JSON object", "write one {...} object per line")
    record["_source"] = f"{file}:{line_number}"
    return record


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a key given twice is an error (json.loads keeps the last silently)."""
    record: dict = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


def _read_parquet(file: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"reading {file} needs pyarrow", "pip install pyarrow, or convert the data to JSONL") from None
    try:
        rows = pq.read_table(file).to_pylist()
    except Exception as err:  # pyarrow raises several types for corrupt files
        raise UserError(f"{file} is not a readable Parquet file ({err})", "re-export it or convert to JSONL") from None
    for row_number, row in enumerate(rows, start=1):
        row["_source"] = f"{file}:row {row_number}"
    return rows
