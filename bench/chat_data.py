"""The benchmark's training data: a seeded chat JSONL with realistic sample lengths (hundreds to a few thousand
tokens per conversation), written from the shipped corpus's words so no download is needed.

    path = write_chat_data(out_dir / "chat.jsonl", records=300)

Both sides of the benchmark read it through the trainer's own pipeline (chat template, loss mask, packing), so
they train on the same tokens, step by step.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from trainer.config import ASSETS_DIR


def write_chat_data(path: Path, records: int = 300, seed: int = 0, words: tuple[int, int] = (200, 1200)) -> Path:
    """Write `records` two-turn conversations to `path` (once: an existing file is reused) and return it. Each
    conversation holds `words` words in all (about 2.3 tokens each with the shipped tokenizer), a quarter of them
    in the user turn."""
    path = Path(path)
    if path.exists():
        return path
    vocabulary = (ASSETS_DIR / "corpus.txt").read_text().split()
    rng = random.Random(seed)
    lines = []
    for _ in range(records):
        total = rng.randint(*words)
        prompt = " ".join(rng.choice(vocabulary) for _ in range(total // 4))
        answer = " ".join(rng.choice(vocabulary) for _ in range(total - total // 4))
        lines.append(json.dumps({"messages": [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}]}))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(path)
    return path
