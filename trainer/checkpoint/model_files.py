"""Check a local Hugging Face model directory's weight files before loading it, so a broken download is one line.

transformers reports a truncated safetensors file, a shard the index names but the directory lacks, or a `.bin`-only
checkpoint with tracebacks from deep inside its loader. Here each is found from the files alone (the index, and each
safetensors header, which `safe_open` parses and checks against the file's length) before any tensor is read.
Tensors missing from the files or of the wrong shape are found by the loader itself (`trainer.models.auto`).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from trainer.errors import UserError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.pth")
DOWNLOAD_AGAIN = "download the checkpoint again (every file the index lists), or point model.name_or_path elsewhere"


def check_weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of `directory`, each with a readable header; UserError for anything else."""
    directory = Path(directory)
    index = directory / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise UserError(f"{index} is not a valid safetensors index (no weight_map)", DOWNLOAD_AGAIN) from None
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise UserError(f"model {directory} is missing shard file(s) {', '.join(missing[:3])} listed in {SAFE_INDEX}",
                            DOWNLOAD_AGAIN)
        files = [directory / name for name in names]
    elif (directory / SAFE_WEIGHTS).is_file():
        files = [directory / SAFE_WEIGHTS]
    else:
        pickled = [name for name in PICKLED if (directory / name).is_file()]
        if pickled or any(directory.glob("pytorch_model-*.bin")):
            raise UserError(f"model {directory} has only PyTorch pickle weights ({pickled[0] if pickled else '*.bin'}),"
                            " which this trainer never loads (unpickling can run code)",
                            "convert them to safetensors (transformers: model.save_pretrained(dir)) on a machine you "
                            "trust, or use the model's safetensors release")
        raise UserError(f"model {directory} has no weights ({SAFE_WEIGHTS} or {SAFE_INDEX})",
                        "point model.name_or_path at a checkpoint directory, or set model.from_config=true to start "
                        "from random weights")
    for path in files:
        try:
            with safe_open(str(path), framework="pt"):
                pass  # parsing the header checks it against the file's length
        except (SafetensorError, OSError) as err:
            detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
            raise UserError(f"model file {path} is damaged or truncated ({detail})", DOWNLOAD_AGAIN) from None
    return files
