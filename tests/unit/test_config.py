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
    (["perf.optimizer=overlap", "optim.max_grad_norm=0", "perf.grad_norm=in-backward"],
     "perf.grad_norm=in-backward takes the norm that clipping reads, and perf.optimizer=overlap has none (it updates "
     "inside the backward)", "set perf.grad_norm=auto or perf.optimizer=auto"),
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

def _numeric_fields() -> list[str]:
    """Every recipe key whose type is a number (or a list of numbers), outside `perf` (choices only)."""
    import dataclasses
    import typing

    from trainer.config import Recipe

    keys = []
    for section in dataclasses.fields(Recipe):
        if section.name == "perf":  # the perf section's values are checked by its own function
            continue
        hints = typing.get_type_hints(section.default_factory)
        for name, hint in hints.items():
            leaf = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
            if leaf in (int, float):
                keys.append(f"{section.name}.{name}")
    return keys


def test_every_numeric_recipe_field_has_a_range():
    from trainer.recipe_ranges import RULES

    assert set(_numeric_fields()) == set(RULES)


def _outside(key: str) -> list:
    """Values just outside the field's range (and NaN for float fields)."""
    from trainer.recipe_ranges import RULES

    rule, values = RULES[key], []
    if rule.low is not None:
        values.append(rule.low - 1)
    if rule.high is not None:
        values.append(rule.high + 1)
    if key in ("optim.max_grad_norm", "optim.lr", "moe.router_z_loss_coef"):
        values += [float("nan"), float("inf")]
    return [[v, 0.9] if key == "optim.betas" else v for v in values]


@pytest.mark.parametrize("key", sorted(__import__("trainer.recipe_ranges", fromlist=["RULES"]).RULES))
def test_each_range_refuses_values_outside_it_in_one_line(key):
    assert _outside(key), key
    for value in _outside(key):
        with pytest.raises(UserError) as err:
            load_recipe("tiny-moe", [f"{key}={value!r}".replace("nan", ".nan").replace("inf", ".inf")])
        message = str(err.value)
        assert key in message and "\n" not in message and "; set " in message, message


def test_values_a_real_recipe_uses_are_in_range():
    for preset in list_presets():
        load_recipe(preset)
    load_recipe("tiny-moe", ["optim.lr=1", "optim.betas=[0,0.999]", "train.seed=4294967295", "optim.min_lr_ratio=0",
                             "parallel.dp_shard_size=-1", "optim.max_grad_norm=-1", "optim.weight_decay=0.1"])


def test_a_key_given_twice_in_a_recipe_file_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name_or_path: x\noptim:\n  lr: 1.0e-4\ntrain:\n  max_steps: 3\noptim:\n  eps: 1.0e-8\n")
    with pytest.raises(UserError, match=r"r\.yaml:7 repeats the key 'optim'"):
        load_recipe(str(path))


def test_a_later_override_of_the_same_key_wins():
    assert load_recipe("tiny-moe", ["train.max_steps=1", "train.max_steps=5"]).train.max_steps == 5
