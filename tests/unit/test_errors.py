"""docs/ERRORS.md, row by row: every bad input gets one line naming the problem and the fix, exit code 2, and no
partial output.

Each CLI case runs `moe` (or `python -m eval`) in process and checks: return code 2, stderr is exactly one line that
starts with "error: <problem>" and contains the fix, and the output directory is either absent or byte-for-byte
as it was. Cases that need several processes or a server are checked at the function that raises.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable

import pytest
from quiet_http import QuietHTTPServer

from trainer.cli import main as moe
from trainer.config import resolve_path
from trainer.errors import UserError

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.seq_len=64", "train.micro_batch_size=2", "train.max_steps=1", "output.export=false"]


@dataclass
class Case:
    id: str
    argv: Callable[[Path], list[str]]  # tmp_path -> the command line (files it needs are written by it)
    problem: str  # the message starts with "error: " + this (a regex)
    fix: str  # ...and contains this


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _train(tmp: Path, *overrides: str) -> list[str]:
    return ["train", "tiny-moe", *TINY, f"output.dir={tmp / 'run'}", *overrides, "--no-progress"]


def _data(tmp: Path, text: str | bytes, *overrides: str) -> list[str]:
    return _train(tmp, f"data.train_path={_write(tmp / 'in' / 'data.jsonl', text)}", *overrides)


def _tokenizer_without_template(tmp: Path) -> Path:
    target = tmp / "in" / "tokenizer"
    shutil.copytree(resolve_path("builtin:tokenizer"), target)
    (target / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((target / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (target / "tokenizer_config.json").write_text(json.dumps(config))
    return target


CHAT = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'

TRAIN_CASES = [
    Case("unknown-key", lambda t: _train(t, "optim.lrr=1e-4"), "unknown recipe key 'optim.lrr'", "did you mean 'optim.lr'"),
    Case("unknown-key-in-file", lambda t: ["train", str(_write(t / "in/r.yaml", "model:\n  name_or_path: x\n"
                                                               "train:\n  max_step: 5\n"))],
         "unknown recipe key 'train.max_step'", "did you mean 'train.max_steps'"),
    Case("unknown-section", lambda t: _train(t, "trainer.max_steps=3"), "unknown recipe key 'trainer.max_steps'",
         "did you mean 'train.max_steps'"),
    Case("wrong-type", lambda t: _train(t, "train.max_steps=ten"), "train.max_steps must be an integer",
         "set train.max_steps=<int>"),
    Case("bad-choice", lambda t: _train(t, "data.format=xml"), "data.format must be one of auto|chat|prompt_completion",
         "set data.format=auto"),
    Case("not-positive", lambda t: _train(t, "data.seq_len=0"), "data.seq_len must be >= 1", "set data.seq_len=1"),
    Case("override-syntax", lambda t: _train(t, "train.max_steps"), "override 'train.max_steps' is not key=value",
         "write it like train.max_steps=100"),
    Case("recipe-not-found", lambda t: ["train", "tiny-mo"], "recipe 'tiny-mo' is neither a file nor a preset",
         "did you mean 'tiny-moe'"),
    Case("recipe-bad-yaml", lambda t: ["train", str(_write(t / "in/r.yaml", "model:\n  name_or_path: [x\n"))],
         r"recipe .*r\.yaml:\d+ is not valid YAML", "fix the syntax at that line"),
    Case("data-missing", lambda t: _train(t, f"data.train_path={t / 'in/none.jsonl'}"),
         r"data file .*none\.jsonl does not exist", "set data.train_path"),
    Case("data-not-utf8", lambda t: _data(t, CHAT.encode() + b'{"prompt": "\xff\xfe"}\n'),
         r".*data\.jsonl:2 is not UTF-8 text", "re-save the file as UTF-8"),
    Case("data-bad-json", lambda t: _data(t, CHAT + '{"messages": [\n'), r".*data\.jsonl:2 is not valid JSON",
         "fix or remove that line"),
    Case("data-not-object", lambda t: _data(t, "[1, 2]\n"), r".*data\.jsonl:1 is not a JSON object",
         "write one {...} object per line"),
    Case("data-empty", lambda t: _data(t, "\n"), r"data file .*data\.jsonl holds no records", "add at least one"),
    Case("data-unknown-format", lambda t: _data(t, '{"body": "hi"}\n', "data.format=auto"),
         r".*data\.jsonl:1 matches no known schema \(keys: \['body'\]\)", "map your columns with data.columns"),
    Case("data-no-assistant", lambda t: _data(t, '{"messages": [{"role": "user", "content": "hi"}]}\n'),
         r".*data\.jsonl:1 has no assistant turn", "add the answer to train on"),
    Case("data-all-too-long", lambda t: _data(t, CHAT, "data.seq_len=4", "data.long_samples=drop"),
         r"no trainable samples in .*dropped 1 too long", "data.long_samples=truncate"),
    Case("no-chat-template", lambda t: _data(t, CHAT, f"model.tokenizer={_tokenizer_without_template(t)}"),
         "the tokenizer has no chat template", "use prompt/completion data or a chat tokenizer"),
    Case("tokenizer-missing", lambda t: _train(t, f"model.tokenizer={t / 'in/no-tokenizer'}"),
         r"cannot load the tokenizer from .*no-tokenizer", "set model.tokenizer"),
    Case("model-missing", lambda t: _train(t, f"model.name_or_path={t / 'in/no-model'}"),
         r"cannot read the model config from .*no-model", "set model.name_or_path"),
    Case("config-override-unknown", lambda t: _train(t, "model.config_overrides.num_expertz=4"),
         "model.config_overrides.num_expertz: Qwen3MoeConfig has no such field", "remove it"),
    Case("ep-without-processes", lambda t: _train(t, "parallel.ep_size=2"),
         "parallel.ep_size=2 needs as many processes", "launch with torchrun"),
    Case("replicate-needs-in-backward", lambda t: _train(t, "parallel.layout=replicate"),
         "parallel.layout=replicate averages gradients inside the backward", "set perf.optimizer=overlap"),
    Case("mesh-does-not-divide", lambda t: _train(t, "parallel.dp_replicate_size=2"),
         "parallel.dp_replicate_size=2 does not divide the world size 1", "choose a dp_replicate_size that divides"),
    Case("resume-not-a-checkpoint", lambda t: _train(t, f"checkpoint.resume={(t / 'in').mkdir() or t / 'in'}"),
         r".*/in is not a training checkpoint \(no meta.json\)", "pass a checkpoints/step_* directory"),
    Case("out-of-range", lambda t: _train(t, "optim.lr=-1e-4"), r"optim.lr must be in \(0, 1\], got -0.0001",
         "set optim.lr to a value in (0, 1]"),
    Case("not-finite", lambda t: _train(t, "optim.max_grad_norm=.inf"), "optim.max_grad_norm must be a finite number",
         "set optim.max_grad_norm to a value that is finite"),
    Case("duplicate-key", lambda t: ["train", str(_write(t / "in/r.yaml", "optim:\n  lr: 1.0e-4\n  lr: 3.0e-4\n"))],
         r"recipe .*r\.yaml:3 repeats the key 'lr'", "keep one of them"),
    Case("usage", lambda t: _train(t, "--no-progres"), "unrecognized arguments: --no-progres",
         "see `moe train --help`"),
    Case("lora-expert-dropout", lambda t: _train(t, "lora.enabled=true", "lora.dropout=0.1"),
         r"lora.dropout=0.1 cannot apply to the routed experts", "set lora.dropout=0 or drop experts"),
    Case("lora-target-unknown", lambda t: _train(t, "lora.enabled=true", "lora.targets=[attention,q_prj]"),
         r"lora.targets q_prj match\(es\) no module of this model", "use the groups attention, experts"),
    Case("data-unknown-role", lambda t: _data(t, CHAT.replace('"assistant"', '"assitant"')),
         r".*data\.jsonl:1 has a message with the unknown role 'assitant' \(message 2\)", "use one of system"),
    Case("data-unknown-speaker", lambda t: _data(t, '{"conversations": [{"from": "human", "value": "hi"}, '
                                                 '{"from": "bot", "value": "hello"}]}\n', "data.format=auto"),
         r".*data\.jsonl:1 has a turn from the unknown speaker 'bot' \(turn 2\)", "use one of human, user, gpt"),
    Case("data-content-part", lambda t: _data(t, '{"messages": [{"role": "user", "content": [{"type": "image"}]}, '
                                              '{"role": "assistant", "content": "a cat"}]}\n'),
         r".*data\.jsonl:1 has a content part of type 'image'", "only text parts"),
    Case("run-length-none", lambda t: _train(t, "train.max_steps=0"), r"the run has no length",
         "set train.max_steps=<steps>, train.epochs=<passes> or train.max_tokens=<tokens>"),
    Case("run-length-twice-in-file", lambda t: ["train", str(_write(t / "in/r.yaml", "model:\n  name_or_path: x\n"
                                                                    "train:\n  max_steps: 5\n  epochs: 2\n"))],
         "the recipe sets both train.max_steps and train.epochs", "keep one of train.max_steps, train.epochs"),
    Case("eval-without-set", lambda t: _train(t, "train.eval_every=5"), r"train.eval_every=5 needs a validation set",
         "set data.eval_path=<file> or data.eval_fraction=0.05"),
    Case("eval-set-twice", lambda t: _train(t, "data.eval_path=v.jsonl", "data.eval_fraction=0.1"),
         r"data.eval_path and data.eval_fraction=0.1 both name a validation set", "keep one of them"),
    Case("patience-without-eval", lambda t: _train(t, "train.early_stop_patience=3"),
         r"train.early_stop_patience=3 counts evaluations, and there are none", "set train.eval_every=<steps>"),
    Case("sources-and-train-path", lambda t: _train(t, "data.sources=[{path: a.jsonl}]"),
         r"data.train_path and data.sources both name the training data", "list every dataset in data.sources"),
    Case("sources-bad-weight", lambda t: _train(t, "data.train_path=", "data.sources=[{path: a.jsonl, weight: -1}]"),
         r"data.sources\[0\].weight must be a number > 0, got -1", "set data.sources[0].weight=1"),
    Case("data-duplicate-key", lambda t: _data(t, '{"prompt": "a", "prompt": "b", "completion": "c"}\n'),
         r".*data\.jsonl:1 repeats the key 'prompt'", "keep one of them"),
    Case("data-too-deep", lambda t: _data(t, '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
         r".*data\.jsonl:1 nests too deeply to read", "a record is one flat object"),
    Case("config-override-bad-value", lambda t: _train(t, "model.config_overrides.num_experts=many"),
         r"model.config_overrides \{'num_experts': 'many'\} do not make a valid Qwen3MoeConfig", "fix or remove them"),
    Case("config-override-not-positive", lambda t: _train(t, "model.config_overrides.num_hidden_layers=0"),
         r"model.config_overrides.num_hidden_layers=0 must be positive \(the config has 2\)", "a positive value"),
    Case("model-weights-truncated", lambda t: _model(t, _truncated), r"model file .*model\.safetensors is damaged or "
         r"truncated \(.*file not fully covered\)", "download the checkpoint again"),
    Case("model-shard-missing", lambda t: _model(t, _shard_missing), r"model .* is missing shard file\(s\) "
         r"model-00002-of-\d+\.safetensors listed in model\.safetensors\.index\.json", "download the checkpoint again"),
    Case("model-bin-only", lambda t: _model(t, _bin_only), r"model .* has only PyTorch pickle weights "
         r"\(pytorch_model\.bin\)", "convert them to safetensors"),
    Case("model-shape-mismatch", lambda t: _model(t, _other_shapes), r"model .* does not match its config: "
         r"model\.layers\.0\.mlp\.experts\.down_proj is \(8, 64, 64\) in the weights but \(8, 64, 32\)",
         "use the config.json that came with the weights"),
    Case("model-lacks-tensor", lambda t: _model(t, _lacking), r"model .* lacks 1 tensor\(s\) the model needs: "
         r"model\.layers\.0\.self_attn\.q_proj\.weight", "download the checkpoint again"),
    Case("attention-unsupported", lambda t: _train(t, f"model.name_or_path={_gpt_oss_config(t)}",
                                                   "model.attn_implementation=sdpa"),
         r"cannot load the model .*gpt-oss: GptOssForCausalLM does not support an attention implementation through "
         r"torch.nn.functional.scaled_dot_product_attention yet;", "model.attn_implementation (auto picks one"),
]


# ---- broken model directories: one saved tiny Qwen3-MoE, damaged a different way per case ------------------------

def _saved(tmp: Path, sharded: bool = False) -> Path:
    """A tiny Qwen3-MoE (the shipped config) saved by transformers, for a case to damage."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_path("builtin:tiny-qwen3-moe")))
    target = tmp / "in" / "model"
    model.save_pretrained(target, **({"max_shard_size": "200KB"} if sharded else {}))
    return target


def _model(tmp: Path, damage) -> list[str]:
    return _train(tmp, f"model.name_or_path={damage(tmp)}", "model.from_config=false")


def _truncated(tmp: Path) -> Path:
    weights = _saved(tmp) / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # a download cut short
    return weights.parent


def _shard_missing(tmp: Path) -> Path:
    target = _saved(tmp, sharded=True)
    next(target.glob("model-00002-of-*.safetensors")).unlink()
    return target


def _bin_only(tmp: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    target = _saved(tmp)
    torch.save(load_file(target / "model.safetensors"), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    return target


def _other_shapes(tmp: Path) -> Path:
    target = _saved(tmp)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 32}))
    return target


def _lacking(tmp: Path) -> Path:
    from safetensors.torch import load_file, save_file

    target = _saved(tmp)
    tensors = load_file(target / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _gpt_oss_config(tmp: Path) -> Path:
    """A tiny GPT-OSS config (attention sinks: transformers has no sdpa path for it) with the shipped vocabulary."""
    from transformers import GptOssConfig

    target = tmp / "in" / "gpt-oss"
    GptOssConfig(vocab_size=1024, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                 layer_types=["sliding_attention", "full_attention"], sliding_window=16).save_pretrained(target)
    return target


# ---- cases on an existing run (one tiny run is trained once and copied) --------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert moe(["train", "tiny-moe", *TINY, f"output.dir={run_dir}", "--no-progress"]) == 0
    return run_dir


def _checkpoint(tmp: Path) -> Path:
    return tmp / "run/checkpoints/step_00000001"


def _edit_meta(tmp: Path, edit) -> None:
    path = _checkpoint(tmp) / "meta.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _missing_shard(tmp: Path) -> list[str]:
    next(_checkpoint(tmp).glob("*.distcp")).unlink()
    return _train(tmp)


def _wrong_shapes(tmp: Path) -> list[str]:
    _edit_meta(tmp, lambda m: m["recipe"]["model"].update(config_overrides={"moe_intermediate_size": 32}))
    return _train(tmp, "model.config_overrides.moe_intermediate_size=32")


def _other_world_size(tmp: Path) -> list[str]:
    _edit_meta(tmp, lambda m: m.update(world_size=2))
    return _train(tmp, "train.max_steps=2")


def _flip_a_byte(tmp: Path) -> list[str]:
    shard = next(_checkpoint(tmp).glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one bit-rotted byte: DCP itself would load it without a word
    shard.write_bytes(bytes(data))
    return _train(tmp)


def _truncated_index_without_checksums(tmp: Path) -> list[str]:
    _edit_meta(tmp, lambda m: m.pop("files"))  # as a checkpoint written before checksums were recorded
    index = _checkpoint(tmp) / ".metadata"
    os.truncate(index, index.stat().st_size // 2)
    return _train(tmp)


def _latest_outside(tmp: Path) -> list[str]:
    (tmp / "run/checkpoints/latest").write_text("../../elsewhere/step_00000009")
    return _train(tmp)


def _other_data(tmp: Path) -> list[str]:
    data = _write(tmp / "in/sft.jsonl", Path(resolve_path("builtin:data/sft.jsonl")).read_text() + CHAT)
    return _train(tmp, f"data.train_path={data}")


def _users_recipe_in_the_run(tmp: Path) -> list[str]:
    recipe = tmp / "run/recipe.yaml"
    recipe.write_text("# my recipe, with my comments\n" + (REPO / "trainer/recipes/tiny-moe.yaml").read_text())
    return ["train", str(recipe), *TINY, f"output.dir={tmp / 'run'}", "--no-progress"]


def _data_inside_the_export(tmp: Path) -> list[str]:
    data = _write(tmp / "run/export/data.jsonl", CHAT)
    return _train(tmp, f"data.train_path={data}")


RUN_CASES = [
    Case("output-dir-taken", lambda t: _train(t, "checkpoint.resume=never"),
         r"output.dir .*run already holds another run \(checkpoints up to step_00000001\)",
         "resume it with checkpoint.resume=auto, start over with output.overwrite=true"),
    Case("checkpoint-missing-shard", _missing_shard, r"checkpoint .*step_00000001 is missing shard file __0_0\.distcp",
         "resume from an older checkpoint"),
    Case("checkpoint-wrong-shapes", _wrong_shapes, r"checkpoint .*step_00000001 does not fit the model being trained",
         "resume with the model config it was trained with"),
    Case("checkpoint-other-model", lambda t: _train(t, "model.config_overrides.num_hidden_layers=1"),
         r"checkpoint .*step_00000001 was trained with model.config_overrides=\{\}, not \{'num_hidden_layers': 1\}",
         "resume with model.config_overrides={}"),
    Case("checkpoint-corrupt", _flip_a_byte, r"checkpoint .*step_00000001 is corrupt: __0_0\.distcp does not match "
         "the checksum recorded when it was written", "resume from an older checkpoint"),
    Case("checkpoint-index-truncated", _truncated_index_without_checksums,
         r"checkpoint .*step_00000001 has an unreadable \.metadata index", "resume from an older checkpoint"),
    Case("latest-outside-run", _latest_outside, r".*checkpoints/latest names '\.\./\.\./elsewhere/step_00000009', "
         r"which is not a complete checkpoint in .*checkpoints",
         "to resume from the newest complete checkpoint (step_00000001)"),
    Case("resume-other-data", _other_data, r"checkpoint .*step_00000001 was trained on other data: .*sft\.jsonl is "
         r"not the file it was trained on", "resume with the data it was trained on"),
    Case("resume-other-seq-len", lambda t: _train(t, "data.seq_len=32"),
         r"checkpoint .*step_00000001 was trained with data.seq_len=64, not 32", "resume with data.seq_len=64"),
    Case("users-recipe-in-output-dir", _users_recipe_in_the_run,
         r".*run/recipe\.yaml was not written by moe train \(your own recipe file\?\)",
         "move your file out of output.dir"),
    Case("input-inside-outputs", _data_inside_the_export,
         r"data.train_path .*run/export/data\.jsonl lies in .*run/export, which this run writes over",
         "copy it out of output.dir"),
    Case("resume-other-world-size", _other_world_size,
         r"checkpoint .*step_00000001 was written by 2 processes but this run has 1", "relaunch with 2 processes"),
    Case("export-not-empty", lambda t: ["export", str(t / "run"), str(_write(t / "in/keep.txt", "x").parent)],
         r"export directory .*in is not empty", "choose another directory or pass --overwrite"),
    Case("export-overwrite-foreign", lambda t: ["export", str(t / "run"), str(_write(t / "in/keep.txt", "x").parent),
                                                "--overwrite"],
         r"export directory .*in holds files that are not a Hugging Face export \(no config\.json\)",
         "--overwrite only replaces an earlier export"),
    Case("export-into-its-run", lambda t: ["export", str(t / "run"), str(t / "run"), "--overwrite"],
         r"export directory .*run would replace .*run/checkpoints, which the export is made from",
         "export outside the run's checkpoints/ and hf/"),
    Case("export-no-checkpoint", lambda t: ["export", str((t / "in").mkdir() or t / "in"), str(t / "out")],
         r".*/in has no checkpoint", "pass a run directory"),
]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


def _check_one_line_error(capsys, code: int, case: Case) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(f"error: {case.problem}", lines[0]), lines[0]
    assert case.fix in lines[0], lines[0]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: c.id)
def test_bad_input_to_moe_train_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, capsys):
    argv = case.argv(tmp_path)
    capsys.readouterr()  # what building the inputs printed (transformers' progress bars) is not the command's
    _check_one_line_error(capsys, moe(argv), case)
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", RUN_CASES, ids=lambda c: c.id)
def test_bad_input_against_an_existing_run_is_one_line_exit_2_and_changes_nothing(case, tmp_path, capsys,
                                                                                   finished_run):
    shutil.copytree(finished_run, tmp_path / "run")
    argv = case.argv(tmp_path)
    before = _snapshot(tmp_path)
    _check_one_line_error(capsys, moe(argv), case)
    assert _snapshot(tmp_path) == before  # no file created, changed or removed


# ---- cases checked at the function that raises ---------------------------------------------------------------------

def _ep_not_dividing_experts():
    from trainer.parallel.config import ParallelConfig
    from trainer.parallel.mesh import mesh_sizes

    mesh_sizes(ParallelConfig(ep_size=3), world_size=3, num_experts=8)


def _layout_too_big_for_the_gpu():
    from trainer.config import load_recipe
    from trainer.planner import check_fits

    check_fits(load_recipe("qwen3-30b-a3b", ["parallel.ep_size=1"]), None, world_size=1, gpu_mem_gib=24.0)


def _serve_port_in_use(tmp: Path):
    from eval.cli import main as eval_main

    _write(tmp / "export/config.json", "{}")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = eval_main(["serve", "--export", str(tmp / "export"), "--port", str(port)])
    assert code == 2
    raise UserError("see stderr")  # the CLI printed it; the test reads it back


class _NeverHealthy(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(503)
        self.end_headers()
        self.wfile.write(b"loading")

    def log_message(self, *args):
        pass


def _server_never_healthy():
    from eval.client import OpenAIClient

    server = QuietHTTPServer(("127.0.0.1", 0), _NeverHealthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        OpenAIClient(f"http://127.0.0.1:{server.server_port}").wait_healthy(timeout=1.0, poll_interval=0.2)
    finally:
        server.shutdown()
        server.server_close()


class _OneAnswer(BaseHTTPRequestHandler):
    """Answers every request with `body` after `delay` seconds (a stalled server: a long delay)."""

    body, delay = b"", 0.0

    def _answer(self):
        time.sleep(self.delay)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_GET = do_POST = _answer  # noqa: N815 - http.server's naming

    def log_message(self, *args):
        pass


def _ask(body: bytes, delay: float = 0.0, request_timeout: float = 5.0):
    """One greedy completion from a server that answers `body`."""
    from eval.client import OpenAIClient, ServerCapabilities
    from eval.parity import served_greedy

    handler = type("Handler", (_OneAnswer,), {"body": body, "delay": delay})
    server = QuietHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = OpenAIClient(f"http://127.0.0.1:{server.server_port}", request_timeout=request_timeout)
        served_greedy(client, ServerCapabilities(completions=True, completion_logprobs=False, models=[]), "hi", 4)
    finally:
        server.shutdown()
        server.server_close()


def _vllm_engine(config: dict, python: str | None = "/venv-vllm/bin/python"):
    from eval.serve import choose_engine

    return choose_engine("vllm", {"model_type": "qwen3_moe", "head_dim": 32, **config}, "cpu", python)


def _server_exits_before_healthy(tmp_path):
    import socket

    from eval.launch import Server
    from eval.tiny import write_tiny_export

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = Server(write_tiny_export(tmp_path / "export"), port, log=tmp_path / "serve.log", engine="transformers")
    server.command = [sys.executable, "-c", "import sys; print('RuntimeError: no kernel for this CPU'); sys.exit(3)"]
    server.start()


def _lora_bf16_base_where_fsdp_groups_need_one_dtype():
    """What a LoRA run with a bf16 base under several processes meets on a torch (2.7) whose FSDP2 groups need one
    dtype for all parameters (this torch's answer is replaced: the check is the same)."""
    from unittest import mock

    import torch

    from trainer.lora import fsdp

    with mock.patch.object(fsdp, "groups_allow_frozen_dtypes", return_value=False):
        fsdp.check_sharded_lora(torch.bfloat16)


FUNCTION_CASES = [
    Case("vllm-cannot-serve-family", lambda t: _vllm_engine({"model_type": "nemotron_h"}),
         r"vLLM does not serve model_type 'nemotron_h' on cpu", "serve it with --engine transformers"),
    Case("vllm-cpu-head-dim", lambda t: _vllm_engine({"head_dim": 16}),
         r"vLLM's CPU attention needs head_dim >= 32 \(the export has 16\)", "serve it with --engine transformers"),
    Case("vllm-not-installed", lambda t: _vllm_engine({}, python=None), r"vLLM is not installed", "make vllm-env"),
    Case("server-exited", _server_exits_before_healthy,
         r"the transformers server exited with code 3 before it was healthy \(RuntimeError: no kernel for this CPU\)",
         "read its log: "),
    Case("lora-sharded-bf16-base", lambda t: _lora_bf16_base_where_fsdp_groups_need_one_dtype(),
         r"lora.enabled=true with a bfloat16 base under FSDP2 needs a torch whose FSDP2 groups may mix frozen dtypes",
         "set model.dtype=float32"),
    Case("ep-not-dividing-experts", lambda t: _ep_not_dividing_experts(),
         "parallel.ep_size=3 does not divide the model's 8 experts", "choose an ep_size that divides"),
    Case("layout-does-not-fit", lambda t: _layout_too_big_for_the_gpu(),
         r"layout ep=1 shard=1 .* needs about [\d.]+ GiB per GPU", "no layout fits on 1 GPUs"),
    Case("server-never-healthy", lambda t: _server_never_healthy(),
         r"server at http://127.0.0.1:\d+ did not become healthy within 1s \(last: HTTP 503: loading\)",
         "check the server's log"),
    Case("server-bad-json", lambda t: _ask(b"<html>502 Bad Gateway</html>"),
         r"POST http://127.0.0.1:\d+/v1/completions answered something that is not JSON",
         "point --base-url at an OpenAI-compatible server"),
    Case("server-no-choices", lambda t: _ask(b'{"choices": []}'), r"/v1/completions answered without any choice",
         "check the server's log"),
    Case("server-stalled", lambda t: _ask(b"{}", delay=3.0, request_timeout=0.3),
         r"POST http://127.0.0.1:\d+/v1/completions got no complete answer within 0.3s", "raise --request-timeout"),
]


@pytest.mark.parametrize("case", FUNCTION_CASES, ids=lambda c: c.id)
def test_bad_input_checked_at_the_function_that_raises(case, tmp_path):
    with pytest.raises(UserError) as err:
        case.argv(tmp_path)
    message = str(err.value)
    assert "\n" not in message and re.match(case.problem, message), message
    assert case.fix in message


def test_serve_port_in_use_is_one_line_exit_2(tmp_path, capsys):
    case = Case("serve-port-in-use", None, r"port \d+ on 127.0.0.1 is already in use",
                "stop the other server or pass --port")
    with pytest.raises(UserError):
        _serve_port_in_use(tmp_path)
    _check_one_line_error(capsys, 2, case)


def test_a_second_trainer_in_the_same_output_dir_is_one_line_exit_2(tmp_path, capsys, finished_run):
    shutil.copytree(finished_run, tmp_path / "run")
    holder = subprocess.Popen(  # another process holding the run's lock, as a running `moe train` does
        [sys.executable, "-c", "import sys, time; from trainer.run_lock import lock_run_dir; "
         "lock_run_dir(sys.argv[1], create=False); print('locked', flush=True); time.sleep(120)", str(tmp_path / "run")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = _snapshot(tmp_path)
        case = Case("output-dir-locked", None, r"output.dir .*run is in use by another trainer \(it holds the lock on "
                    r".*run/\.lock\)", "wait for that run to finish or stop it")
        _check_one_line_error(capsys, moe(_train(tmp_path, "train.max_steps=2")), case)
        assert _snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


def test_an_export_to_a_full_disk_is_one_line_exit_2_and_keeps_the_previous_export(tmp_path, capsys, finished_run):
    import resource

    shutil.copytree(finished_run, tmp_path / "run")
    out = tmp_path / "out"
    assert moe(["export", str(tmp_path / "run"), str(out)]) == 0
    before = _snapshot(tmp_path)
    capsys.readouterr()
    # The kernel refuses writes past 64 KiB, as a full disk would (EFBIG, "File too large").
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        code = moe(["export", str(tmp_path / "run"), str(out), "--overwrite"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    case = Case("export-disk-full", None, r"cannot write the export to .*out \(File too large\)",
                "the run's checkpoints")
    _check_one_line_error(capsys, code, case)
    assert _snapshot(tmp_path) == before  # the previous export as it was, no temporary left


ALL_IDS = [c.id for c in TRAIN_CASES + RUN_CASES + FUNCTION_CASES] + ["serve-port-in-use", "output-dir-locked",
                                                                       "export-disk-full"]


def test_docs_errors_table_lists_exactly_the_tested_cases():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", (REPO / "docs/ERRORS.md").read_text(), flags=re.MULTILINE)
    assert sorted(rows) == sorted(ALL_IDS)
    assert len(ALL_IDS) >= 20
