"""The range of every numeric recipe field, checked when the recipe is loaded (`trainer.config.validate`).

Types alone let through values that crash deep inside torch with a traceback, or worse, train: a negative lr or a
min_lr_ratio above 1 runs AdamW uphill, a beta of 1 never forgets, a seed of 2**32 crashes numpy after the model is
built. Each rule says what the optimizer or loop can use; NaN and infinity are refused everywhere.

The `perf` section is left to its own checks (its choices are checked by their types).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.errors import UserError


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed (lr > 0)
    high_open: bool = False
    also: tuple = ()  # single values allowed outside the range (dp_shard_size=-1)

    def admits(self, value: float) -> bool:
        if value in self.also:
            return True
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        if self.low is None and self.high is None:
            return "that is finite"
        extra = "".join(f" or {_num(v)}" for v in self.also)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}{extra}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_num(self.low)}, {_num(self.high)}{right}{extra}"


AT_LEAST_ONE = Range(1)
NOT_NEGATIVE = Range(0)

RULES: dict[str, Range] = {
    "data.seq_len": AT_LEAST_ONE,
    "optim.lr": Range(0, 1, low_open=True),
    "optim.weight_decay": Range(0, 1),
    "optim.betas": Range(0, 1, high_open=True),  # each of the two
    "optim.eps": Range(0, 1, low_open=True),
    "optim.warmup_steps": NOT_NEGATIVE,
    "optim.min_lr_ratio": Range(0, 1),
    "optim.max_grad_norm": Range(),  # any finite number: <= 0 disables clipping
    "train.micro_batch_size": AT_LEAST_ONE,
    "train.grad_accum_steps": AT_LEAST_ONE,
    "train.max_steps": NOT_NEGATIVE,  # 0 with train.epochs or train.max_tokens (trainer.config.validate_length)
    "train.epochs": NOT_NEGATIVE,
    "train.max_tokens": NOT_NEGATIVE,
    "train.eval_every": NOT_NEGATIVE,  # 0: no evaluation
    "train.early_stop_patience": NOT_NEGATIVE,  # 0: never stop early
    "data.eval_fraction": Range(0, 1, high_open=True),
    "data.num_proc": NOT_NEGATIVE,  # 0: auto
    "train.seed": Range(0, 2**32 - 1),  # numpy's seed range
    "train.log_every": AT_LEAST_ONE,
    "train.nonfinite_max_consecutive": AT_LEAST_ONE,
    "train.profile_step": NOT_NEGATIVE,  # 0: no profiled step
    "checkpoint.every_steps": NOT_NEGATIVE,
    "checkpoint.keep_last": AT_LEAST_ONE,
    "parallel.ep_size": AT_LEAST_ONE,
    "parallel.dp_shard_size": Range(1, also=(-1,)),
    "parallel.dp_replicate_size": AT_LEAST_ONE,
    "moe.aux_free_bias_rate": Range(0, 1),
    "moe.router_z_loss_coef": NOT_NEGATIVE,
    "lora.rank": AT_LEAST_ONE,
    "lora.alpha": Range(0, low_open=True),
    "lora.dropout": Range(0, 1, high_open=True),
}

# Strings that must not be empty: an empty path or mode is never what the user meant.
NON_EMPTY = {
    "model.name_or_path": "set model.name_or_path=<hub id or local dir>",
    "data.train_path": "set data.train_path=<file.jsonl>",
    "output.dir": "set output.dir=<directory for checkpoints and the export>",
    "checkpoint.resume": "set checkpoint.resume=auto, never or a checkpoint path",
}


def check_ranges(recipe) -> None:
    """UserError (one line, with the fix) for the first field outside its range."""
    for key, fix in NON_EMPTY.items():
        if key == "data.train_path" and recipe.data.sources:  # several datasets name their own paths
            continue
        if not str(_get(recipe, key) or "").strip():
            raise UserError(f"{key} is empty", fix)
    for key, rule in RULES.items():
        value = _get(recipe, key)
        for name, item in _items(key, value):
            if not _finite(item):
                raise UserError(f"{name} must be a finite number, got {item}", f"set {key} to a value {rule.describe()}")
            if not rule.admits(item):
                fix = f"set {key}={_num(rule.low)} or more" if rule.high is None and not (rule.low_open or rule.also) else \
                    f"set {key} to a value {rule.describe()}"
                raise UserError(f"{name} must be {rule.describe()}, got {_num(item)}", fix)


def _num(value: float) -> str:
    """1 for 1.0, 4294967295 for 2**32 - 1 (not 4.29497e+09), 0.001 for 1e-3."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else f"{value:g}"


def _get(recipe, dotted: str):
    section, field = dotted.split(".")
    return getattr(getattr(recipe, section), field)


def _items(key: str, value) -> list[tuple[str, float]]:
    if isinstance(value, (list, tuple)):
        return [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    return [(key, value)]


def _finite(value) -> bool:
    return isinstance(value, int) or math.isfinite(value)
