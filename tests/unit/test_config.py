"""The recipe schema: presets by name, typed dotted overrides, one-line errors that name the closest valid key."""

from __future__ import annotations

import pytest

from trainer.cli import main as moe
from trainer.config import all_keys, list_presets, load_recipe, resolve_path
from trainer.errors import EXIT_USER_ERROR, UserError

REQUIRED_KEYS = [
    "model.name_or_path", "data.train_path", "data.seq_len", "train.micro_batch_size", "train.grad_accum_steps",
    "train.max_steps", "train.seed", "optim.lr", "output.dir", "checkpoint.every_steps", "checkpoint.resume",
    "parallel.ep_size", "parallel.dp_shard_size", "model.dtype", "model.trust_remote_code", "model.config_overrides",
    "model.from_config", "data.format", "data.packing", "data.long_samples", "optim.weight_decay", "optim.betas",
    "optim.warmup_steps", "optim.min_lr_ratio", "optim.max_grad_norm", "train.precision", "train.log_every",
    "checkpoint.keep_last", "output.overwrite", "parallel.dp_replicate_size", "parallel.dispatcher",
    "parallel.activation_checkpointing", "perf.compile", "train.nonfinite_max_consecutive",
]


def test_schema_has_every_documented_key():
    assert set(REQUIRED_KEYS) <= set(all_keys())


def test_presets_load_by_name():
    assert {"tiny-moe", "qwen3-30b-a3b"} <= set(list_presets())
    big = load_recipe("qwen3-30b-a3b")
    assert big.model.name_or_path == "Qwen/Qwen3-30B-A3B"
    assert big.data.seq_len == 4096 and big.train.precision == "bf16-mixed"
    assert big.model.trust_remote_code is False


def test_recipe_loads_from_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  name_or_path: some/model\ndata:\n  train_path: train.jsonl\n  seq_len: 512\n")
    recipe = load_recipe(str(path))
    assert recipe.model.name_or_path == "some/model" and recipe.data.seq_len == 512


def test_dotted_overrides_are_typed():
    recipe = load_recipe("tiny-moe", [
        "optim.lr=1e-4", "train.max_steps=7", "data.packing=false", "optim.betas=[0.8,0.9]",
        "checkpoint.resume=never", "model.config_overrides.num_hidden_layers=1",
    ])
    assert recipe.optim.lr == pytest.approx(1e-4) and isinstance(recipe.optim.lr, float)
    assert recipe.train.max_steps == 7 and recipe.data.packing is False
    assert recipe.optim.betas == [0.8, 0.9] and recipe.checkpoint.resume == "never"
    assert recipe.model.config_overrides == {"num_hidden_layers": 1}


def test_builtin_paths_resolve_into_the_shipped_assets():
    recipe = load_recipe("tiny-moe")
    assert resolve_path(recipe.data.train_path).endswith("trainer/assets/data/sft.jsonl")
    assert resolve_path("some/hub-id") == "some/hub-id"


@pytest.mark.parametrize("override, closest", [
    ("optim.lrr=1e-3", "optim.lr"),
    ("train.max_step=3", "train.max_steps"),
    ("lr=3e-4", "optim.lr"),
    ("data.seqlen=128", "data.seq_len"),
])
def test_unknown_key_names_the_closest_valid_key(override, closest):
    with pytest.raises(UserError, match=f"did you mean '{closest}'"):
        load_recipe("tiny-moe", [override])


@pytest.mark.parametrize("override, expected", [
    ("train.max_steps=abc", "integer"),
    ("train.precision=fp16", "auto|fp32|bf16-mixed|bf16"),
    ("data.packing=maybe", "true or false"),
    ("train.seed=1.5", "integer"),
])
def test_wrong_type_says_what_is_expected(override, expected):
    with pytest.raises(UserError, match=expected):
        load_recipe("tiny-moe", [override])


def test_unknown_key_in_a_yaml_file_is_rejected(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  name_or_path: x\n  dtyp: bfloat16\ndata:\n  train_path: t.jsonl\n")
    with pytest.raises(UserError, match="did you mean 'model.dtype'"):
        load_recipe(str(path))


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UserError, match="did you mean 'tiny-moe'"):
        load_recipe("tiny-mo")


def test_cli_exits_2_with_one_line_naming_the_closest_key(capsys, tmp_path):
    code = moe(["train", "tiny-moe", "optim.lrr=1e-3", f"output.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USER_ERROR
    assert len(err.splitlines()) == 1 and "optim.lr" in err and "optim.lrr" in err
    assert not (tmp_path / "run").exists()  # a user error leaves no partial output


@pytest.mark.parametrize("overrides, problem, fix", [
    (["perf.optimizer=in-backward"],  # tiny-moe clips at optim.max_grad_norm=1
     "perf.optimizer=in-backward updates inside the backward, so gradients cannot be clipped (optim.max_grad_norm=1)",
     "set optim.max_grad_norm=0 or perf.optimizer=auto"),
    (["perf.optimizer=overlap", "optim.max_grad_norm=0", "train.grad_accum_steps=2"],
     "perf.optimizer=overlap updates inside the backward, so gradients cannot be accumulated "
     "(train.grad_accum_steps=2)", "set train.grad_accum_steps=1 or perf.optimizer=auto"),
    (["perf.defer=head"], "perf.defer=head holds back updates of an in-backward optimizer",
     "set perf.optimizer=overlap (or in-backward), or perf.defer=none"),
    (["perf.compile=layers-graphs", "train.grad_accum_steps=4"],
     "perf.compile=layers-graphs keeps no gradient across micro-batches (train.grad_accum_steps=4)",
     "set perf.compile=layers (or auto), or train.grad_accum_steps=1"),
])
def test_perf_options_that_the_step_cannot_honour_are_refused_in_one_line(overrides, problem, fix):
    with pytest.raises(UserError) as err:
        load_recipe("tiny-moe", overrides)
    assert str(err.value) == f"{problem}; {fix}"


def test_in_backward_optimizers_load_without_clipping_or_accumulation():
    recipe = load_recipe("tiny-moe", ["perf.optimizer=overlap", "perf.defer=head", "optim.max_grad_norm=0"])
    assert (recipe.perf.optimizer, recipe.perf.defer) == ("overlap", "head")
    assert load_recipe("tiny-moe", ["perf.compile=layers-graphs"]).perf.compile == "layers-graphs"


def test_cli_refuses_clipping_with_an_in_backward_optimizer_in_one_line(capsys, tmp_path):
    code = moe(["train", "tiny-moe", "perf.optimizer=overlap", f"output.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USER_ERROR
    assert len(err.splitlines()) == 1 and "cannot be clipped" in err and "optim.max_grad_norm=0" in err
    assert not (tmp_path / "run").exists()
