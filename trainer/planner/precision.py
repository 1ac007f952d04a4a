"""Bytes per parameter under each `train.precision` recipe (what the trainer keeps resident on a rank).

| precision   | params | grads | AdamW m, v | compute copies         | foreach AdamW temp |
|-------------|--------|-------|------------|------------------------|--------------------|
| bf16        | 2      | 2     | 2 + 2      | none (params are bf16) | 2                  |
| bf16-mixed  | 4      | 4     | 4 + 4      | bf16 unit copies (FSDP2 MixedPrecisionPolicy) | 4 |
| fp32        | 4      | 4     | 4 + 4      | none                   | 4                  |

`bf16` is the benchmark protocol's baseline recipe (optimizer states in the param dtype). `bf16-mixed` keeps fp32
master weights, fp32 gradients and fp32 AdamW states; compute runs on bf16 copies that FSDP2 all-gathers one unit
(decoder layer) at a time. The foreach AdamW step allocates one state-sized temporary for the whole parameter list
(`_foreach_sqrt(exp_avg_sq)`); the fused step does not.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import UserError


@dataclass(frozen=True)
class Precision:
    name: str
    param_bytes: int
    grad_bytes: int
    state_bytes: int  # both AdamW moments together
    compute_bytes: int  # activations and the weights the matmuls read
    reduce_bytes: int  # dtype of the gradient reduce-scatter
    mixed: bool  # compute copies differ from the stored params


PRECISIONS = {
    "bf16": Precision("bf16", 2, 2, 4, 2, 2, False),
    "bf16-mixed": Precision("bf16-mixed", 4, 4, 8, 2, 4, True),
    "fp32": Precision("fp32", 4, 4, 8, 4, 4, False),
}
ALIASES = {"auto": "bf16-mixed", "fp32-master": "bf16-mixed", "bf16_mixed": "bf16-mixed", "float32": "fp32"}


def precision(name: str) -> Precision:
    """The Precision for a recipe's `train.precision` (`auto` means bf16-mixed: the planner targets GPUs)."""
    key = ALIASES.get(name, name)
    if key not in PRECISIONS:
        raise UserError(f"unknown precision '{name}'", f"use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[key]


def optimizer_temp_bytes(prec: Precision, fused: bool) -> int:
    """Bytes per parameter the optimizer step allocates on top of the resident state."""
    return 0 if fused else prec.state_bytes // 2
