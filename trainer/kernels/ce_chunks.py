"""How the chunked linear cross-entropy splits its rows (torch-free: the memory planner reads it too)."""

from __future__ import annotations

import math

DEFAULT_CHUNK_BYTES = 1 << 30  # fp32 logits of one chunk; bounds the transient memory of the loss


def chunk_rows(num_rows: int, vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk: at most `chunk_bytes` of fp32 logits, and the rows split into equal chunks (one tail at most)."""
    most = max(1, min(num_rows, chunk_bytes // (4 * vocab)))
    chunks = math.ceil(num_rows / most)
    return math.ceil(num_rows / chunks)
