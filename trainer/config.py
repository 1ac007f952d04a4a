"""The recipe: one typed schema for a fine-tuning job, loaded from YAML with dotted `key=value` overrides.

A recipe is a YAML file (or the name of a preset in `trainer/recipes/`) whose sections map onto the dataclasses
below. Every key is checked: an unknown key or a value of the wrong type is a `UserError` naming the closest valid
key or the expected type, so a typo never trains the wrong job silently.

    recipe = load_recipe("tiny-moe", ["train.max_steps=50", "optim.lr=3e-4"])

Paths may start with `builtin:` to point into the shipped assets (`builtin:tokenizer`, `builtin:data/sft.jsonl`),
so presets work from any working directory; `resolve_path` turns them into real paths.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.errors import UserError
from trainer.parallel.config import ParallelConfig

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_PREFIX = "builtin:"


@dataclass
class ModelConfig:
    name_or_path: str = ""  # hub id, local HF dir, or a config-only dir (with from_config: true)
    tokenizer: str | None = None  # defaults to name_or_path
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # parameter dtype; auto follows train.precision
    trust_remote_code: bool = False
    from_config: bool = False  # random init from the config instead of loading weights
    config_overrides: dict = field(default_factory=dict)  # applied to the HF config before the model is built
    # transformers' attention; auto: flex attention on CUDA for packed data, else sdpa where the model supports it,
    # else eager (trainer.build.attention_implementation)
    attn_implementation: str = "auto"


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes token ids (docs/DATA.md, `trainer.data`)."""

    # a JSONL, Parquet or Arrow file, a `save_to_disk` directory, or a Hugging Face Hub dataset name
    train_path: str = ""
    format: Literal["auto", "chat", "prompt_completion", "sharegpt", "alpaca", "text"] = "auto"  # trainer.data.schemas
    columns: dict = field(default_factory=dict)  # schema name -> the dataset's column, e.g. {prompt: question}
    # several datasets mixed by weight instead of train_path: [{path: a.jsonl, weight: 3}, {path: b, format: text}]
    # (keys: path, weight, format, columns, split)
    sources: list[dict] = field(default_factory=list)
    split: str = "train"  # the split of a hub dataset or a save_to_disk DatasetDict
    eval_path: str = ""  # a validation set (any form train_path takes), or:
    eval_fraction: float = 0.0  # records held out of the training data, per dataset, for validation
    seq_len: int = 2048
    packing: bool = True  # several samples per sequence, positions restart per sample, no cross-sample attention
    long_samples: Literal["truncate", "drop"] = "truncate"
    shuffle: bool = True
    cache_dir: str = ""  # tokenized datasets, shared by runs and ranks; "" = $MOE_DATA_CACHE or ~/.cache/moe-stack/data
    num_proc: int = 0  # tokenizing processes; 0: one per CPU core (at most 8), small datasets in the trainer itself


@dataclass
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    max_grad_norm: float = 1.0  # <= 0 disables clipping


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    grad_accum_steps: int = 1
    # how long to train: one of max_steps, epochs (passes over the training data) or max_tokens (input tokens, all
    # ranks); setting one on the command line clears the others
    max_steps: int = 100
    epochs: float = 0.0
    max_tokens: int = 0
    eval_every: int = 0  # validation loss every N optimizer steps (and at the last); needs data.eval_path/eval_fraction
    early_stop_patience: int = 0  # stop after this many evaluations without a new best validation loss; 0: never
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16"] = "auto"  # auto: bf16-mixed on GPU, fp32 on CPU
    log_every: int = 1
    nonfinite_max_consecutive: int = 3  # skip steps with NaN/inf loss or grads, stop after this many in a row
    profile_step: int = 0  # profile this optimizer step (profile.txt + trace in the run directory); 0: none


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at the end
    resume: str = "auto"  # auto (latest in output.dir, if any) | never | a checkpoint path
    keep_last: int = 2
    save_final: bool = True  # a checkpoint at the last step (false: only the every_steps ones, e.g. for benchmarks)


@dataclass
class TrackingConfig:
    """Experiment trackers besides metrics.jsonl and TensorBoard (`trainer.tracking`)."""

    wandb: bool = False  # log to Weights & Biases (pip install wandb)
    wandb_project: str = "moe-stack"
    wandb_mode: Literal["auto", "online", "offline"] = "auto"  # auto: $WANDB_MODE, else online with an API key
    wandb_run_name: str = ""  # "" = the name of output.dir


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    overwrite: bool = False  # allow starting a fresh run in a directory that holds another run's checkpoints
    export: bool = True  # write a Hugging Face checkpoint to <dir>/export at the end
    export_dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: float32 for fp32 training, else bfloat16


@dataclass
class PerfConfig:
    """Speed/memory options of the training step (`trainer.perf`, `trainer.step`). Every key's `auto` picks what pays
    on the device without changing what the recipe trains (docs/BENCHMARKS.md): `perf: auto` is the whole section at
    its defaults."""

    # linear + cross-entropy in chunks, never the full logits (auto: on)
    fused_ce: Literal["auto", "on", "off"] = "auto"
    fused_experts: Literal["auto", "on", "off"] = "auto"  # memory-lean expert MLP (auto: on CUDA)
    kernels: Literal["auto", "liger", "torch"] = "auto"  # auto: Liger RMSNorm/SwiGLU where importable on CUDA
    # torch.compile per decoder layer; "layers-graphs" also replays each layer as CUDA graphs (one CUDA process or a
    # layout with static shapes, bf16 weights). auto: on CUDA layers-graphs beside an in-backward optimizer (where
    # graphs can run), else layers; off on CPU. The first batch is run once before training; a failure there falls back to eager in one
    # process, and stops several processes with a one-line error.
    compile: Literal["auto", "off", "layers", "layers-graphs"] = "auto"
    # when AdamW runs: after the backward (clipping, accumulation and skipping a non-finite step all work), or inside
    # it as each layer's gradients complete ("in-backward"; "overlap": on a side CUDA stream under the backward).
    # The in-backward modes need optim.max_grad_norm: 0 and train.grad_accum_steps: 1. auto: after-backward.
    optimizer: Literal["auto", "after-backward", "in-backward", "overlap"] = "auto"
    adamw: Literal["auto", "torch", "triton"] = "auto"  # the update kernel; auto: Triton on CUDA where importable
    # the output head's (and the last N / all layers') updates wait for the next forward, which applies each one
    # (on a side CUDA stream) just before the module reads it: the memory-bound AdamW runs under the forward. Any
    # optimizer mode (after the backward: with the step's clipping and skip); unsharded parameters only.
    # auto: all on CUDA beside AdamW after the backward (measured B1-bs1 1.64x -> 2.00x), else none
    defer: Literal["auto", "none", "head", "1", "2", "3", "4", "all"] = "auto"
    # when the gradient norm (for clipping, the skip and the metrics) is taken: in one pass after the backward, or
    # each gradient's norm as it completes during the last micro-batch's backward, on a side CUDA stream
    # ("in-backward": the same value, one process's plain parameters). auto: in-backward on CUDA in one process beside
    # AdamW after the backward without CUDA-graph layers, else after-backward
    grad_norm: Literal["auto", "after-backward", "in-backward"] = "auto"
    # with the overlapped optimizer: the layers' CUDA graphs / the whole step on a high-priority stream, so AdamW's
    # blocks take only the SMs the step leaves; auto: high in one process, default beside gradient collectives
    graph_priority: Literal["auto", "default", "high"] = "auto"
    step_priority: Literal["auto", "default", "high"] = "auto"
    # the next micro-batches copied to the GPU from pinned memory while the current step runs (auto: on CUDA)
    prefetch: Literal["auto", "on", "off"] = "auto"


@dataclass
class MoEConfig:
    # Aux-loss-free balancing (DeepSeek-V3): after each step, move each router's e_score_correction_bias by
    # rate * sign(mean load - load), loads summed over all ranks. 0 disables it; DeepSeek-V3 used 0.001.
    # Only families whose routers have the bias (DeepSeek-V3, Nemotron-H) are affected.
    aux_free_bias_rate: float = 0.0
    # Router z-loss (ST-MoE): adds coef * mean logsumexp(router logits)^2 to the loss; 0 disables it (ST-MoE: 1e-3).
    router_z_loss_coef: float = 0.0


@dataclass
class LoraConfig:
    """Low-rank adapters instead of full fine-tuning (`trainer.lora`, docs/LORA.md): base weights frozen, only the
    adapters train, checkpoint and export (PEFT's format)."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0  # on the adapter's input; PEFT has none for routed experts, so 0 when "experts" is a target
    # groups: attention (q/k/v/o projections), experts (routed experts' fused 3-D weights), shared_experts,
    # mamba (Mamba2 in_proj; PEFT refuses out_proj there); any other entry is a module name suffix (PEFT's target_modules)
    targets: list[str] = field(default_factory=lambda: ["attention", "experts"])


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def list_presets() -> list[str]:
    """Names of the shipped recipes (`trainer/recipes/<name>.yaml`)."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_path(path: str | None) -> str | None:
    """`builtin:<rel>` -> the absolute path inside trainer/assets; anything else is returned unchanged."""
    if path and path.startswith(BUILTIN_PREFIX):
        return str(ASSETS_DIR / path[len(BUILTIN_PREFIX):])
    return path


def load_recipe(recipe: str, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from a YAML path or a preset name, then apply `key=value` overrides (dotted keys).

    The file it came from is kept as `recipe.source_file` (not a field: it is not part of the saved recipe), so the
    run can refuse to write over it.
    """
    path = _find_recipe_file(recipe)
    config = from_dict(_read_yaml(path))
    for override in overrides or []:  # in order: a later override of the same key wins, as on any command line
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise UserError(f"override '{override}' is not key=value", "write it like train.max_steps=100")
        set_value(config, key.strip(), _parse_value(key.strip(), value))
        if key.strip() in RUN_LENGTH:
            choose_run_length(config, key.strip())
    validate(config)
    config.source_file = str(path.resolve())
    return config


def _parse_value(key: str, text: str) -> Any:
    """An override's value as YAML (1e-4, [0.9,0.95], true); the empty string stays a string."""
    if not text.strip():
        return ""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, RecursionError):
        raise UserError(f"override {key}={text[:60]} is not a valid YAML value",
                        "quote strings with special characters, write lists like [0.9,0.95]") from None


def from_dict(raw: dict) -> Recipe:
    """Build a Recipe from nested dicts, checking every key and type."""
    config = Recipe()
    items = _flatten(raw)
    for key, value in items:
        set_value(config, key, value)
    given = [k for k, v in items if k in RUN_LENGTH and v]
    if len(given) > 1:
        raise UserError(f"the recipe sets both {given[0]} and {given[1]}",
                        f"keep one of {', '.join(RUN_LENGTH)} (the run length is one choice)")
    if given:
        choose_run_length(config, given[0])
    return config


RUN_LENGTH = ("train.max_steps", "train.epochs", "train.max_tokens")


def choose_run_length(config: Recipe, key: str) -> None:
    """`key` (one of RUN_LENGTH) decides how long the run is: the other two are cleared when it is set."""
    if not getattr(config.train, key.split(".")[1]):
        return
    for other in RUN_LENGTH:
        if other != key:
            setattr(config.train, other.split(".")[1], 0)


def set_value(config: Recipe, dotted_key: str, value: Any) -> None:
    """Set `section.key` (or `section.dict_key.sub_key` for dict fields) with type checking."""
    parts = dotted_key.split(".")
    section_name, key = parts[0], ".".join(parts[1:2])
    sections = {f.name for f in dataclasses.fields(Recipe)}
    section = getattr(config, section_name) if section_name in sections else None
    hints = typing.get_type_hints(type(section)) if section is not None and key else {}
    if key not in hints:
        raise UserError(f"unknown recipe key '{dotted_key}'", f"did you mean '{closest_key(dotted_key)}'?")
    hint = hints[key]
    if len(parts) > 2:  # model.config_overrides.num_hidden_layers=2
        if hint is not dict:
            raise UserError(f"unknown recipe key '{dotted_key}'", f"did you mean '{closest_key(dotted_key)}'?")
        getattr(section, key)[".".join(parts[2:])] = value
        return
    setattr(section, key, _coerce(f"{section_name}.{key}", value, hint))


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. `optim.lr`."""
    keys = []
    for section in dataclasses.fields(Recipe):
        keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(section.default_factory())]
    return keys


def closest_key(key: str) -> str:
    """The valid dotted key nearest to `key` (by spelling, then by its last part)."""
    keys = all_keys()
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
    by_leaf = difflib.get_close_matches(key.split(".")[-1], [k.split(".")[-1] for k in keys], n=1, cutoff=0.8)
    if by_leaf and (not match or difflib.SequenceMatcher(None, key, match[0]).ratio() < 0.8):
        return next(k for k in keys if k.split(".")[-1] == by_leaf[0])
    return match[0]


ATTENTION = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def validate(config: Recipe) -> None:
    """Every field in its range (`trainer.recipe_ranges`), and cross-field checks that types alone cannot express."""
    from trainer.recipe_ranges import check_ranges

    if len(config.optim.betas) != 2:
        raise UserError(f"optim.betas needs two values, got {config.optim.betas}", "write optim.betas=[0.9,0.95]")
    check_ranges(config)
    attn = config.model.attn_implementation
    if attn.removeprefix("paged|") not in ATTENTION and "/" not in attn:  # org/repo: a kernel from the Hub
        raise UserError(f"model.attn_implementation must be one of {'|'.join(ATTENTION)} (or a Hub kernel "
                        f"org/name), got {attn!r}", "set model.attn_implementation=auto")
    validate_perf(config)
    validate_parallel(config)
    validate_lora(config)
    validate_data(config)


def validate_parallel(config: Recipe) -> None:
    """`parallel.layout: replicate` averages the gradients inside the backward (the in-backward optimizer does it
    layer by layer), holds the whole model on every rank and has no expert split or HSDP of its own."""
    parallel = config.parallel
    if parallel.layout != "replicate":
        return
    if config.perf.optimizer not in ("in-backward", "overlap"):
        raise UserError("parallel.layout=replicate averages gradients inside the backward, which needs an "
                        f"in-backward optimizer (perf.optimizer={config.perf.optimizer})",
                        "set perf.optimizer=overlap (or in-backward) with optim.max_grad_norm=0, "
                        "or parallel.layout=fsdp")
    parallel.check_layout_sizes()
    if config.lora.enabled:
        raise UserError("lora.enabled=true trains under parallel.layout=fsdp only",
                        "set parallel.layout=fsdp (the adapters are sharded with their layers)")


def validate_data(config: Recipe) -> None:
    """Run length, validation set and datasets: the choices that only make sense together."""
    train, data = config.train, config.data
    if not (train.max_steps or train.epochs or train.max_tokens):
        raise UserError("the run has no length (train.max_steps, train.epochs and train.max_tokens are all 0)",
                        "set train.max_steps=<steps>, train.epochs=<passes> or train.max_tokens=<tokens>")
    if data.eval_path and data.eval_fraction:
        raise UserError(f"data.eval_path and data.eval_fraction={data.eval_fraction:g} both name a validation set",
                        "keep one of them")
    if train.eval_every and not (data.eval_path or data.eval_fraction):
        raise UserError(f"train.eval_every={train.eval_every} needs a validation set",
                        "set data.eval_path=<file> or data.eval_fraction=0.05")
    if train.early_stop_patience and not train.eval_every:
        raise UserError(f"train.early_stop_patience={train.early_stop_patience} counts evaluations, and there are none",
                        "set train.eval_every=<steps> (and data.eval_path or data.eval_fraction)")
    if data.sources and data.train_path:
        raise UserError("data.train_path and data.sources both name the training data",
                        "list every dataset in data.sources, or set data.sources=[]")
    from trainer.data.mixing import check_sources

    check_sources(data.sources)


def validate_lora(config: Recipe) -> None:
    """What the LoRA path cannot do yet, refused before anything is built (`trainer.lora.targets` checks the names
    against the model once it exists)."""
    from trainer.lora.targets import check_recipe_targets

    lora = config.lora
    if not lora.enabled:
        return
    check_recipe_targets(lora.targets)
    if lora.dropout > 0 and "experts" in lora.targets:
        raise UserError(f"lora.dropout={lora.dropout:g} cannot apply to the routed experts (PEFT's adapter for fused "
                        "expert weights has no dropout)", "set lora.dropout=0 or drop experts from lora.targets")


def validate_perf(config: Recipe) -> None:
    """The `perf` options that change what a step can do: an optimizer that updates inside the backward leaves no
    moment where every gradient exists, so it rules out clipping and accumulation; CUDA graphs keep no gradient
    across micro-batches."""
    perf = config.perf
    if perf.optimizer in ("in-backward", "overlap"):
        if config.optim.max_grad_norm > 0:
            raise UserError(f"perf.optimizer={perf.optimizer} updates inside the backward, so gradients cannot be "
                            f"clipped (optim.max_grad_norm={config.optim.max_grad_norm:g})",
                            "set optim.max_grad_norm=0 or perf.optimizer=auto")
        if config.train.grad_accum_steps > 1:
            raise UserError(f"perf.optimizer={perf.optimizer} updates inside the backward, so gradients cannot be "
                            f"accumulated (train.grad_accum_steps={config.train.grad_accum_steps})",
                            "set train.grad_accum_steps=1 or perf.optimizer=auto")
        if perf.grad_norm == "in-backward":
            raise UserError(f"perf.grad_norm=in-backward takes the norm that clipping reads, and perf.optimizer="
                            f"{perf.optimizer} has none (it updates inside the backward)",
                            "set perf.grad_norm=auto or perf.optimizer=auto")
    if perf.compile == "layers-graphs" and config.train.grad_accum_steps > 1:
        raise UserError("perf.compile=layers-graphs keeps no gradient across micro-batches "
                        f"(train.grad_accum_steps={config.train.grad_accum_steps})",
                        "set perf.compile=layers (or auto), or train.grad_accum_steps=1")


def _find_recipe_file(recipe: str) -> Path:
    path = Path(recipe)
    if path.is_file():
        return path
    preset = RECIPES_DIR / f"{recipe}.yaml"
    if preset.is_file():
        return preset
    presets = list_presets()
    near = difflib.get_close_matches(recipe, presets, n=1, cutoff=0.0)
    hint = f"did you mean '{near[0]}'? presets: {', '.join(presets)}" if near else "pass a YAML file path"
    raise UserError(f"recipe '{recipe}' is neither a file nor a preset", hint)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, mark):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.problem_mark = key, mark


def _read_yaml(path: Path) -> dict:
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as err:
        raise UserError(f"recipe {path}:{err.problem_mark.line + 1} repeats the key '{err.key}'",
                        "keep one of them (YAML would silently use the last)") from None
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f"{path}:{line + 1}" if line is not None else str(path)
        raise UserError(f"recipe {where} is not valid YAML", "fix the syntax at that line") from None
    except RecursionError:
        raise UserError(f"recipe {path} nests too deeply to read", "a recipe is sections of key: value") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read recipe {path} ({type(err).__name__})", "check the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path} is not a mapping of sections", "start it with e.g. 'model:'")
    return raw


def _flatten(raw: dict) -> list[tuple[str, Any]]:
    items = []
    for section, values in raw.items():
        if section == "perf" and values == "auto":  # `perf: auto`: every speed option at its default
            continue
        if not isinstance(values, dict):
            raise UserError(f"recipe section '{section}' must be a mapping", f"did you mean '{closest_key(section)}'?")
        items += [(f"{section}.{key}", value) for key, value in values.items()]
    return items


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check (and gently convert) `value` against the field's type; raise a one-line UserError otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in args:  # YAML reads a bare on/off as a bool
            value = "on" if value else "off"
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in args:
            return str(value)  # YAML reads defer: 1 as an integer
        if value in args:
            return value
        raise UserError(f"{key} must be one of {'|'.join(map(str, args))}, got {value!r}", f"set {key}={args[0]}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(key, v, args[0]) for v in value]
        raise UserError(f"{key} must be a list, got {value!r}", f"write it like {key}=[0.9,0.95]")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif hint is dict:
        if isinstance(value, dict):
            return dict(value)
    name = getattr(hint, "__name__", str(hint))
    expected = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                "dict": "a mapping"}
    raise UserError(f"{key} must be {expected.get(name, name)}, got {value!r}", f"set {key}=<{name}>")
