"""SFT data: JSONL/Parquet records -> chat or prompt/completion token ids with loss masks -> packed micro-batches."""

from trainer.data.dataset import DatasetStats, SFTDataset, build_dataset
from trainer.data.loader import StatefulLoader
from trainer.data.render import IGNORE_INDEX, TokenizedSample, render_record

__all__ = [
    "IGNORE_INDEX", "DatasetStats", "SFTDataset", "StatefulLoader", "TokenizedSample", "build_dataset", "render_record",
]
