"""`eval validate` against a real HTTP server that, like vLLM, returns completion logprobs and echoes the prompt.

The server here is a small OpenAI-style endpoint backed by transformers (vLLM itself needs a GPU). It lets the
logprob and multiple-choice-through-the-server paths run for real, and it can serve a deliberately broken copy
of the export to show that validation catches it.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from quiet_http import QuietHTTPServer

from eval.cli import main
from eval.reference import Reference
from eval.validate import validate


class LogprobServer:
    """/health, /v1/models and /v1/completions (greedy, `logprobs`, `echo`, `text_offset`) over one export."""

    def __init__(self, export_dir: Path | None, healthy: bool = True, fail: dict | None = None):
        self.reference = Reference(export_dir, device="cpu") if export_dir else None
        self.healthy = healthy
        self.fail = fail or {}  # prompt -> HTTP status to answer instead (0: drop the connection unanswered)
        self.lock = threading.Lock()
        self.httpd = QuietHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _completion(self, body: dict) -> dict:
        ref, prompt = self.reference, body["prompt"]
        gen = ref.greedy(prompt, body["max_tokens"])
        text, token_logprobs, offsets = gen.text, gen.token_logprobs, []
        if body.get("echo"):
            import torch

            enc = ref.tokenizer(prompt, return_offsets_mapping=True, return_tensors="pt")
            with torch.no_grad():
                logprobs_SV = torch.log_softmax(ref.model(input_ids=enc["input_ids"]).logits[0].float(), -1)
            ids = enc["input_ids"][0].tolist()
            prompt_logprobs = [None] + [logprobs_SV[s - 1, ids[s]].item() for s in range(1, len(ids))]
            offsets = [start for start, _ in enc["offset_mapping"][0].tolist()]
            token_logprobs = prompt_logprobs + token_logprobs
            text = prompt + text
        offsets += [len(text)] * (len(token_logprobs) - len(offsets))  # generated tokens' offsets: not needed here
        logprobs = {"token_logprobs": token_logprobs, "text_offset": offsets} if body.get("logprobs") else None
        return {"choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}]}

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200 if server.healthy else 503, {})
                elif self.path == "/v1/models":
                    self._send(200, {"data": [{"id": "served"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/completions":
                    self._send(404, {"error": "not found"})
                elif body.get("model") != "served":
                    self._send(400, {"error": f"unknown model {body.get('model')}"})
                elif body["prompt"] in server.fail:
                    if server.fail[body["prompt"]]:
                        self._send(server.fail[body["prompt"]], {"error": "engine failure"})
                    else:
                        self.close_connection = True  # no status line at all: the client sees a reset
                        self.connection.shutdown(2)
                else:
                    with server.lock:
                        self._send(200, server._completion(body))

        return Handler


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    from eval.tiny import write_tiny_export

    return write_tiny_export(tmp_path_factory.mktemp("export") / "export")


@pytest.fixture(scope="module")
def experts_swapped_export(export_dir, tmp_path_factory) -> Path:
    """The same export with experts 0 and 1 exchanged in every layer (router untouched): a wrong expert key map."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export_dir)
    for name, param in model.named_parameters():
        if ".experts." in name:
            param.data[[0, 1]] = param.data[[1, 0]].clone()
    out = tmp_path_factory.mktemp("broken") / "export"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(export_dir).save_pretrained(out)
    return out


@pytest.fixture()
def small_task(tmp_path) -> Path:
    task = tmp_path / "task.jsonl"
    rows = [{"question": "Two plus two equals", "choices": ["four", "five", "six"], "answer": 0},
            {"question": "The sun rises in the", "choices": ["west", "east"], "answer": 1},
            {"question": "Bees make", "choices": ["milk", "honey", "silk"], "answer": 1}]
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return task


def test_logprob_and_multiple_choice_checks_run_where_the_server_returns_logprobs(export_dir, small_task, tmp_path):
    with LogprobServer(export_dir) as server:
        report = validate(export_dir, server.url, tmp_path / "report.json", timeout=10, max_tokens=6,
                          task_path=small_task, device="cpu")
    assert report["passed"] is True
    assert report["server"] == {**report["server"], "api": "completions", "logprobs": True, "model": "served"}
    checks = {c["name"]: c for c in report["checks"]}
    assert all(c["passed"] is True for c in checks.values())
    # Same weights, same fp32 kernels: logprobs agree far below the 0.5-nat tolerance.
    assert checks["logprobs"]["value"] < 1e-4
    assert report["multiple_choice"]["agreement"] == 1.0
    assert report["multiple_choice"]["server_accuracy"] == report["multiple_choice"]["local_accuracy"]
    assert json.loads((tmp_path / "report.json").read_text()) == report


def test_experts_served_in_the_wrong_order_fail_validation(export_dir, experts_swapped_export, small_task, tmp_path):
    with LogprobServer(experts_swapped_export) as server:
        report = validate(export_dir, server.url, tmp_path / "report.json", timeout=10, max_tokens=6,
                          task_path=small_task, device="cpu")
    assert report["passed"] is False
    failed = {c["name"] for c in report["checks"] if c["passed"] is False}
    assert "greedy_exact_match" in failed
    diverged = [i for i in report["greedy"]["items"] if not i["match"]]
    assert diverged and all(i["first_divergence_token"] is not None for i in diverged)


def test_cli_exits_1_and_prints_the_summary_when_a_check_fails(
    export_dir, experts_swapped_export, small_task, tmp_path, capsys
):
    with LogprobServer(experts_swapped_export) as server:
        code = main(["validate", "--export", str(export_dir), "--base-url", server.url, "--report",
                     str(tmp_path / "r.json"), "--timeout", "10", "--max-tokens", "6", "--task", str(small_task)])
    out = capsys.readouterr().out
    assert code == 1
    assert out.startswith("validate FAILED")
    assert len(out.splitlines()) <= 24  # one screen


def test_a_server_that_never_becomes_healthy_is_a_one_line_error_with_exit_2(export_dir, tmp_path, capsys):
    with LogprobServer(None, healthy=False) as server:
        code = main(["validate", "--export", str(export_dir), "--base-url", server.url,
                     "--report", str(tmp_path / "r.json"), "--timeout", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "did not become healthy within 1s" in err and "HTTP 503" in err
    assert not (tmp_path / "r.json").exists()


def test_nothing_listening_is_the_same_one_line_error(export_dir, tmp_path, capsys):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        code = main(["validate", "--export", str(export_dir), "--base-url", f"http://127.0.0.1:{port}",
                     "--report", str(tmp_path / "r.json"), "--timeout", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "did not become healthy" in err


def test_failed_requests_are_recorded_per_prompt_and_fail_the_run_without_a_crash(export_dir, small_task, tmp_path,
                                                                                  capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Water boils at"}\n{"prompt": "Bees make"}\n{"prompt": "The sky is"}\n')
    with LogprobServer(export_dir, fail={"Water boils at": 500, "Bees make": 0}) as server:
        code = main(["validate", "--export", str(export_dir), "--base-url", server.url, "--report",
                     str(tmp_path / "r.json"), "--timeout", "10", "--max-tokens", "4", "--prompts", str(prompts),
                     "--task", str(small_task)])
    out = capsys.readouterr().out
    assert code == 1
    report = json.loads((tmp_path / "r.json").read_text())
    items = {i["prompt"]: i for i in report["greedy"]["items"]}
    assert items["Water boils at"]["error"].startswith("HTTP 500") and not items["Water boils at"]["match"]
    assert items["Bees make"]["error"] and not items["Bees make"]["match"]
    assert items["The sky is"]["error"] is None and items["The sky is"]["match"]
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["server_errors"] == {**checks["server_errors"], "value": 2, "passed": False}
    assert "server failed 2 of 3 prompts; first: 'Water boils at': HTTP 500" in out
