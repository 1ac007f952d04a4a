"""What a run was trained on, and the files a user gave it: a resume must find the first unchanged, and the run must
never delete or overwrite the second.

- `fingerprint(recipe)`: SHA-256 of the data file and of the model's config.json (for a local model directory),
  stored in every checkpoint's meta.json (`inputs`).
- `check_same_inputs(checkpoint, meta, recipe)`: the recipe fields that decide the model and the tokenized data
  (model path and overrides, data file, format, seq_len, packing, long-sample rule) and the fingerprints must equal
  the checkpoint's. A different dataset or seq_len would resume the loader at a position of another sample list; a
  different model would load weights into the wrong architecture or silently continue another run.
- `check_inputs_survive(recipe, fresh)`: no input (recipe file, data file, model or tokenizer directory) may lie
  where the run writes: its checkpoints (pruned), export (replaced), metrics, plots, tensorboard, recipe.yaml.
"""

from __future__ import annotations

from pathlib import Path

from trainer.config import Recipe, resolve_path
from trainer.errors import UserError
from trainer.redact import redact_tree

# Recipe fields a resume must keep: they decide the architecture or the tokenized sample list the loader indexes.
SAME_ON_RESUME = ("model.name_or_path", "model.config_overrides", "data.format", "data.seq_len", "data.packing",
                  "data.long_samples", "data.sources", "data.columns", "data.split", "data.eval_fraction")
# What the trainer writes in output.dir on every run (RUN_OUTPUTS minus `hf`, which only ever holds its own copy of
# the model's config and tokenizer): a user's file there would be pruned, replaced or overwritten.
WRITTEN = ("checkpoints", "export", "metrics.jsonl", "tensorboard", "loss.png", "expert_load.png", "recipe.yaml",
           "best.json", "wandb")

_digests: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256: each save reuses the first hash


def _sha256(path: Path) -> str | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        from trainer.checkpoint.integrity import file_digest

        _digests[key] = file_digest(path)["sha256"]
    return _digests[key]


def fingerprint(recipe: Recipe) -> dict:
    """{"data_sha256", "model_config_sha256"} of the files the recipe names (None where there is no local file)."""
    data = Path(resolve_path(recipe.data.train_path) or "")
    model = Path(resolve_path(recipe.model.name_or_path) or "")
    return {"data_sha256": _sha256(data) if data.is_file() else None,
            "model_config_sha256": _sha256(model / "config.json") if (model / "config.json").is_file() else None}


def _field(tree: dict, dotted: str):
    section, key = dotted.split(".")
    return tree.get(section, {}).get(key, _MISSING)


_MISSING = object()


def check_same_inputs(checkpoint: Path, meta: dict, recipe: Recipe) -> None:
    """UserError when the recipe would resume `checkpoint` on another model or other data (see the module doc)."""
    saved = meta.get("recipe", {})
    current = redact_tree(recipe.to_dict())  # saved values were redacted the same way
    fresh = "or start a new run in another output.dir (from this run's export if you want its weights)"
    for dotted in SAME_ON_RESUME:
        before, now = _field(saved, dotted), _field(current, dotted)
        if before is not _MISSING and before != now:
            raise UserError(f"checkpoint {checkpoint} was trained with {dotted}={before!r}, not {now!r}",
                            f"resume with {dotted}={before!r}, {fresh}")
    inputs, now = meta.get("inputs") or {}, fingerprint(recipe)
    if not inputs.get("data_sha256"):  # a checkpoint written before fingerprints: at least the same file name
        before = _field(saved, "data.train_path")
        if before is not _MISSING and before != current["data"]["train_path"]:
            raise UserError(f"checkpoint {checkpoint} was trained with data.train_path={before!r}, "
                            f"not {current['data']['train_path']!r}", f"resume with the data it was trained on, {fresh}")
    if inputs.get("data_sha256") and now["data_sha256"] and inputs["data_sha256"] != now["data_sha256"]:
        raise UserError(f"checkpoint {checkpoint} was trained on other data: {recipe.data.train_path} is not the "
                        f"file it was trained on (sha256 {now['data_sha256'][:12]}..., not {inputs['data_sha256'][:12]}"
                        "...)", f"resume with the data it was trained on, {fresh}")
    if (inputs.get("model_config_sha256") and now["model_config_sha256"]
            and inputs["model_config_sha256"] != now["model_config_sha256"]):
        raise UserError(f"checkpoint {checkpoint} was trained from another model: the config.json in "
                        f"{recipe.model.name_or_path} has changed since",
                        f"resume with the model it was trained from, {fresh}")


def inputs_of(recipe: Recipe) -> dict[str, Path]:
    """Local files and directories the run reads, by the recipe key that names them."""
    named = {"data.train_path": recipe.data.train_path, "data.eval_path": recipe.data.eval_path,
             "model.name_or_path": recipe.model.name_or_path,
             "model.tokenizer": recipe.model.tokenizer}
    for i, source in enumerate(recipe.data.sources):
        named[f"data.sources[{i}]"] = source.get("path")
    found = {key: Path(resolve_path(value)) for key, value in named.items() if isinstance(value, str) and value and
             Path(resolve_path(value)).exists()}
    source = getattr(recipe, "source_file", None)
    if source:
        found["the recipe file"] = Path(source)
    return found


def check_inputs_survive(recipe: Recipe, run_dir: Path, own_recipe_file: bool) -> None:
    """UserError when an input lies where this run writes (`WRITTEN` in output.dir), so it would be lost.

    own_recipe_file: output.dir's recipe.yaml is the record an earlier start of this run wrote, which may be
    rewritten (`moe train <output.dir>/recipe.yaml` re-runs a run from its own record).
    """
    run = run_dir.resolve()
    for key, path in inputs_of(recipe).items():
        resolved = path.resolve()
        for name in WRITTEN:
            target = run / name
            if resolved != target and target not in resolved.parents:
                continue
            if name == "recipe.yaml" and own_recipe_file:
                continue
            raise UserError(f"{key} {path} lies in {target}, which this run writes over",
                            "copy it out of output.dir, or pick another output.dir")
