"""The validator's own input files (prompts, multiple-choice tasks): one JSON object per line, each bad line a
one-line UserError that names the file, the line and the command-line flag to change."""

from __future__ import annotations

import json
from pathlib import Path

from trainer.errors import UserError


def read_objects(path: str | Path, flag: str) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`; `flag` is the option that named the file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path} ({getattr(err, 'strerror', None) or type(err).__name__})",
                        f"pass a readable UTF-8 JSONL file with {flag}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raise UserError(f"{path}:{number} is not valid JSON", "fix or remove that line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number} is not a JSON object", "write one {...} object per line")
        rows.append((number, row))
    return rows
