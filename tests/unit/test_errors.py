"""docs/ERRORS.md, row by row: every bad input gets one line naming the problem and the fix, exit code 2, and no
partial output.

Each CLI case runs `moe` (or `python -m eval`) in process and checks: return code 2, stderr is exactly one line that
starts with "error: <problem>" and contains the fix, and the output directory is either absent or byte-for-byte
as it was. Cases that need several processes or a server are checked at the function that raises.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Callable

import pytest

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
    Case("data-unknown-format", lambda t: _data(t, '{"text": "hi"}\n', "data.format=auto"),
         r".*data\.jsonl:1 has neither 'messages' nor 'prompt'/'completion'", "use chat records"),
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
    Case("mesh-does-not-divide", lambda t: _train(t, "parallel.dp_replicate_size=2"),
         "parallel.dp_replicate_size=2 does not divide the world size 1", "choose a dp_replicate_size that divides"),
    Case("resume-not-a-checkpoint", lambda t: _train(t, f"checkpoint.resume={(t / 'in').mkdir() or t / 'in'}"),
         r".*/in is not a training checkpoint \(no meta.json\)", "pass a checkpoints/step_* directory"),
]


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


RUN_CASES = [
    Case("output-dir-taken", lambda t: _train(t, "checkpoint.resume=never"),
         r"output.dir .*run already holds another run \(checkpoints up to step_00000001\)",
         "resume it with checkpoint.resume=auto, start over with output.overwrite=true"),
    Case("checkpoint-missing-shard", _missing_shard, r"checkpoint .*step_00000001 is missing shard file __0_0\.distcp",
         "resume from an older checkpoint"),
    Case("checkpoint-wrong-shapes", _wrong_shapes, r"checkpoint .*step_00000001 does not fit the model being trained",
         "resume with the model config it was trained with"),
    Case("checkpoint-other-model", lambda t: _train(t, "model.config_overrides.num_hidden_layers=1"),
         r"checkpoint .*step_00000001 was trained with model.config_overrides=\{\}", "use the same model"),
    Case("resume-other-world-size", _other_world_size,
         r"checkpoint .*step_00000001 was written by 2 processes but this run has 1", "relaunch with 2 processes"),
    Case("export-not-empty", lambda t: ["export", str(t / "run"), str(t / "run/checkpoints")],
         r"export directory .*checkpoints is not empty", "choose another directory or pass --overwrite"),
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

    server = HTTPServer(("127.0.0.1", 0), _NeverHealthy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        OpenAIClient(f"http://127.0.0.1:{server.server_port}").wait_healthy(timeout=1.0, poll_interval=0.2)
    finally:
        server.shutdown()
        server.server_close()


FUNCTION_CASES = [
    Case("ep-not-dividing-experts", lambda t: _ep_not_dividing_experts(),
         "parallel.ep_size=3 does not divide the model's 8 experts", "choose an ep_size that divides"),
    Case("layout-does-not-fit", lambda t: _layout_too_big_for_the_gpu(),
         r"layout ep=1 shard=1 .* needs about [\d.]+ GiB per GPU", "no layout fits on 1 GPUs"),
    Case("server-never-healthy", lambda t: _server_never_healthy(),
         r"server at http://127.0.0.1:\d+ did not become healthy within 1s \(last: HTTP 503: loading\)",
         "check the server's log"),
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


ALL_IDS = [c.id for c in TRAIN_CASES + RUN_CASES + FUNCTION_CASES] + ["serve-port-in-use"]


def test_docs_errors_table_lists_exactly_the_tested_cases():
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", (REPO / "docs/ERRORS.md").read_text(), flags=re.MULTILINE)
    assert sorted(rows) == sorted(ALL_IDS)
    assert len(ALL_IDS) >= 20
