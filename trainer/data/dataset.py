"""The tokenized SFT dataset: every record rendered once, long samples truncated or dropped, all of it counted."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.data.render import TokenizedSample, render_record
from trainer.data.sources import read_records
from trainer.errors import UserError


@dataclass
class DatasetStats:
    records: int = 0
    samples: int = 0  # kept for training
    truncated: int = 0  # longer than seq_len, cut to seq_len
    dropped_long: int = 0  # longer than seq_len, dropped (data.long_samples=drop)
    dropped_no_target: int = 0  # nothing left to train on (e.g. the answer fell beyond seq_len)
    tokens: int = 0
    target_tokens: int = 0

    def summary(self) -> str:
        return (
            f"{self.samples} samples from {self.records} records "
            f"({self.tokens} tokens, {self.target_tokens} trained on); truncated {self.truncated}, "
            f"dropped {self.dropped_long} too long and {self.dropped_no_target} without target"
        )


@dataclass
class SFTDataset:
    samples: list[TokenizedSample]
    stats: DatasetStats = field(default_factory=DatasetStats)

    def __len__(self) -> int:
        return len(self.samples)


def build_dataset(path: str, tokenizer, seq_len: int, data_format: str = "auto", long_samples: str = "truncate"):
    """Read, render and length-filter `path`; raises UserError if nothing is left to train on."""
    records = read_records(path)
    stats = DatasetStats(records=len(records))
    samples = []
    for record in records:
        sample = render_record(record, tokenizer, data_format)
        if len(sample) > seq_len:
            if long_samples == "drop":
                stats.dropped_long += 1
                continue
            stats.truncated += 1
            sample = TokenizedSample(sample.input_ids[:seq_len], sample.loss_mask[:seq_len])
        if not any(sample.loss_mask[1:]):  # the first token is never a target: nothing precedes it
            stats.dropped_no_target += 1
            continue
        samples.append(sample)
        stats.tokens += len(sample)
        stats.target_tokens += sum(sample.loss_mask[1:])
    stats.samples = len(samples)
    if not samples:
        raise UserError(
            f"no trainable samples in {path} ({stats.summary()})",
            "check data.format, or raise data.seq_len / use data.long_samples=truncate",
        )
    return SFTDataset(samples, stats)
