"""`python -m eval validate`: wait for the server, compare it with transformers on the export, write a report.

Checks (each one named in the report, the run fails if any fails):
- server_errors: requests the server failed (HTTP 4xx/5xx, a reset connection); each is recorded on its item and
  counts as a mismatch, and any failure fails the run (the validator itself never crashes on one)
- greedy_exact_match: share of prompts whose served greedy tokens equal transformers' (>= --min-exact-match):
  token ids where the server returns them (vLLM), else the texts (a trailing partial UTF-8 character forgiven)
- logprobs: largest |served - reference| token logprob on the common prefix (<= --logprob-tolerance), when the
  server returns logprobs; skipped otherwise
- mc_agreement: share of multiple-choice items where the server's log-likelihood pick equals the local pick
  (>= --min-mc-agreement), when the server returns logprobs; skipped otherwise
- mc_accuracy: local multiple-choice accuracy (>= --min-accuracy; 0 by default, random tiny models know nothing)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from eval import multiple_choice, parity
from eval.client import OpenAIClient
from eval.jsonl import read_objects
from eval.reference import Reference
from trainer.errors import UserError

DEFAULT_PROMPTS = Path(__file__).parent / "data" / "greedy_prompts.jsonl"


@dataclass
class Thresholds:
    min_exact_match: float = 1.0
    logprob_tolerance: float = 0.5  # nats; catches junk weights (several nats off), tolerates bf16 kernel noise
    min_mc_agreement: float = 1.0
    min_accuracy: float = 0.0


def load_prompts(path: str | Path = DEFAULT_PROMPTS) -> list[str]:
    prompts = []
    for number, row in read_objects(path, "--prompts"):
        if not isinstance(row.get("prompt"), str):
            raise UserError(f"{path}:{number} has no string 'prompt'", 'write {"prompt": "..."} per line')
        prompts.append(row["prompt"])
    return prompts


def check(name: str, value: float | None, passed: bool | None, detail: str) -> dict:
    """One report row; passed None means skipped (the server cannot answer it)."""
    return {"name": name, "value": value, "passed": passed, "detail": detail}


def run_checks(greedy: dict, mc: dict, limits: Thresholds) -> list[dict]:
    errors = greedy.get("errors", 0) + mc.get("errors", 0)
    rows = [check("server_errors", errors, errors == 0, "failed requests == 0")] if errors else []
    rate = greedy["exact_match_rate"]
    compared = "token ids" if "token_ids" in (greedy.get("compared") or []) else "text"
    rows.append(check("greedy_exact_match", rate, rate >= limits.min_exact_match,
                      f">= {limits.min_exact_match:g} ({compared})"))
    diff = greedy["max_abs_logprob_diff"]
    rows.append(
        check("logprobs", diff, None, "server returns no logprobs")
        if diff is None
        else check("logprobs", diff, diff <= limits.logprob_tolerance, f"max |diff| <= {limits.logprob_tolerance:g} nats")
    )
    agreement = mc["agreement"]
    rows.append(
        check("mc_agreement", agreement, None, "server returns no prompt logprobs")
        if agreement is None
        else check("mc_agreement", agreement, agreement >= limits.min_mc_agreement, f">= {limits.min_mc_agreement:g}")
    )
    accuracy = mc["local_accuracy"]
    rows.append(check("mc_accuracy", accuracy, accuracy >= limits.min_accuracy, f">= {limits.min_accuracy:g}"))
    return rows


def validate(
    export: str | Path,
    base_url: str,
    report_path: str | Path,
    timeout: float = 600.0,
    model: str | None = None,
    max_tokens: int = 16,
    prompts_path: str | Path = DEFAULT_PROMPTS,
    task_path: str | Path = multiple_choice.DEFAULT_TASK,
    limits: Thresholds = Thresholds(),
    device: str = "auto",
    dtype: str = "auto",
    api: str = "auto",
    request_timeout: float = 300.0,
) -> dict:
    """Run every check; write the JSON report to `report_path` and return it (report['passed'] is the verdict)."""
    prompts = load_prompts(prompts_path)
    task = multiple_choice.load_task(task_path)
    client = OpenAIClient(base_url, model=model, request_timeout=request_timeout)
    health_seconds = client.wait_healthy(timeout)
    caps = client.probe()
    if api == "chat":  # compare through the chat template even where /v1/completions exists
        caps.completions, caps.completion_logprobs = False, False
    reference = Reference(export, device=device, dtype=dtype)

    started = time.monotonic()
    greedy = parity.summarize_greedy(parity.compare_greedy(client, caps, reference, prompts, max_tokens))
    mc = multiple_choice.evaluate(task, reference, client, caps)
    checks = run_checks(greedy, mc, limits)
    report = {
        "passed": all(c["passed"] is not False for c in checks),
        "export": str(export),
        "server": {
            "base_url": client.base_url,
            "model": client.model,
            "api": "completions" if caps.completions else "chat",
            "logprobs": caps.completion_logprobs,
            "token_ids": caps.token_ids,
            "seconds_to_healthy": round(health_seconds, 2),
        },
        "max_tokens": max_tokens,
        "checks": checks,
        "greedy": greedy,
        "multiple_choice": {"task": str(task_path), **mc},
        "seconds": round(time.monotonic() - started, 2),
    }
    report_path = Path(report_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = report_path.with_suffix(report_path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(report_path)  # never a half-written report
    return report


def summary(report: dict) -> str:
    """One screen: the verdict, each check, and the first divergent prompt if any."""
    server = report["server"]
    lines = [
        f"validate {'PASSED' if report['passed'] else 'FAILED'}: {report['export']} served at {server['base_url']}",
        f"  server api={server['api']} logprobs={'yes' if server['logprobs'] else 'no'} model={server['model']}",
    ]
    for c in report["checks"]:
        status = "skip" if c["passed"] is None else ("ok" if c["passed"] else "FAIL")
        value = "-" if c["value"] is None else f"{c['value']:.4g}"
        lines.append(f"  {status:4s} {c['name']:20s} {value:>8s}  {c['detail']}")
    failed = [item for item in report["greedy"]["items"] if item.get("error")]
    if failed:
        lines.append(f"  server failed {len(failed)} of {len(report['greedy']['items'])} prompts; first: "
                     f"{failed[0]['prompt']!r}: {failed[0]['error'][:120]}")
    if report.get("multiple_choice", {}).get("first_error"):
        lines.append(f"  server failed {report['multiple_choice']['errors']} multiple-choice items; first: "
                     f"{report['multiple_choice']['first_error'][:120]}")
    for item in report["greedy"]["items"]:
        if not item["match"] and not item.get("error"):
            lines.append(
                f"  first divergence on {item['prompt']!r}: token {item['first_divergence_token']}, "
                f"char {item['first_divergence_char']}"
            )
            lines.append(f"    reference: {item['reference'][:100]!r}")
            lines.append(f"    served:    {item['served'][:100]!r}")
            break
    return "\n".join(lines)
