"""One key-conversion table per family: in-memory HF v5 parameter names <-> on-disk checkpoint keys.

transformers v5 keeps experts stacked in memory (`mlp.experts.gate_up_proj [E, 2I, H]`) while published
checkpoints store one tensor per expert (`mlp.experts.{e}.gate_proj.weight [I, H]`, ...). A `KeyTable` describes
that mapping declaratively and is used in both directions: loading reads each expert's slice straight into the
stacked tensor (or into this rank's expert shard), exporting writes the per-expert keys back.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StackedExperts:
    """A stacked in-memory expert tensor and the per-expert disk tensors concatenated (dim 0) into each slice."""

    memory_suffix: str  # e.g. "mlp.experts.gate_up_proj"
    disk_templates: tuple[str, ...]  # relative to the same prefix, "{e}" = expert index

    def matches(self, name: str) -> bool:
        return name.endswith("." + self.memory_suffix) or name == self.memory_suffix


@dataclass(frozen=True)
class KeyTable:
    """Renames (memory substring, disk substring) applied to every key, plus the stacked expert tensors."""

    family: str
    stacked: tuple[StackedExperts, ...] = ()
    renames: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def to_disk_name(self, memory_name: str) -> str:
        """A rename whose memory part starts with "^" applies to the key's prefix only."""
        for memory_part, disk_part in self.renames:
            if memory_part.startswith("^"):
                if memory_name.startswith(memory_part[1:]):
                    memory_name = disk_part + memory_name[len(memory_part) - 1 :]
            else:
                memory_name = memory_name.replace(memory_part, disk_part)
        return memory_name

    def stacked_rule(self, memory_name: str) -> StackedExperts | None:
        return next((rule for rule in self.stacked if rule.matches(memory_name)), None)

    def expert_disk_keys(self, memory_name: str, expert: int) -> list[str]:
        """Disk keys holding expert `expert`'s slice of a stacked tensor, in concatenation order."""
        rule = self.stacked_rule(memory_name)
        assert rule is not None, memory_name
        prefix = memory_name[: len(memory_name) - len(rule.memory_suffix)]
        return [self.to_disk_name(prefix + template.format(e=expert)) for template in rule.disk_templates]


GATED_EXPERTS = (
    StackedExperts("mlp.experts.gate_up_proj", ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight")),
    StackedExperts("mlp.experts.down_proj", ("mlp.experts.{e}.down_proj.weight",)),
)

QWEN2_STYLE = KeyTable(family="qwen2_moe", stacked=GATED_EXPERTS)

MIXTRAL = KeyTable(
    family="mixtral",
    stacked=(
        StackedExperts("mlp.experts.gate_up_proj", ("mlp.experts.{e}.w1.weight", "mlp.experts.{e}.w3.weight")),
        StackedExperts("mlp.experts.down_proj", ("mlp.experts.{e}.w2.weight",)),
    ),
    renames=((".mlp.", ".block_sparse_moe."),),
)

NEMOTRON_H = KeyTable(
    family="nemotron_h",
    stacked=(
        StackedExperts("mixer.experts.up_proj", ("mixer.experts.{e}.up_proj.weight",)),
        StackedExperts("mixer.experts.down_proj", ("mixer.experts.{e}.down_proj.weight",)),
    ),
    renames=(("^model.", "backbone."),),
)

# Families whose checkpoints already store stacked experts (no conversion in transformers).
IDENTITY = KeyTable(family="identity")

_TABLES_BY_PATTERN = {"qwen2_moe": QWEN2_STYLE, "mixtral": MIXTRAL, "nemotron_h": NEMOTRON_H}


def key_table_for(model_type: str) -> KeyTable | None:
    """The key table for a model_type, following transformers' own family grouping; None if unknown."""
    from transformers import conversion_mapping

    pattern = conversion_mapping._MODEL_TO_CONVERSION_PATTERN.get(model_type, model_type)  # noqa: SLF001
    if pattern in _TABLES_BY_PATTERN:
        return _TABLES_BY_PATTERN[pattern]
    if conversion_mapping.get_checkpoint_conversion_mapping(pattern) is None:
        return IDENTITY
    return None
