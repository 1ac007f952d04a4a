"""The pieces of `eval validate` that need no model: text comparison, pass/fail rules, task files, the summary."""

from __future__ import annotations

import json

import pytest

from eval.multiple_choice import DEFAULT_TASK, load_task
from eval.parity import first_difference
from eval.validate import DEFAULT_PROMPTS, Thresholds, load_prompts, run_checks, summary
from trainer.errors import UserError


@pytest.mark.parametrize(
    ("reference", "served", "index"),
    [("abc", "abc", None), ("abc", "abd", 2), ("abc", "ab", 2), ("", "x", 0), ("x y", "x  y", 2)],
)
def test_first_difference_is_the_first_differing_character(reference, served, index):
    assert first_difference(reference, served) == index


def _greedy(rate, diff=None):
    return {"exact_match_rate": rate, "max_abs_logprob_diff": diff, "prompts": 1, "items": []}


def _mc(agreement=None, accuracy=0.25):
    return {"agreement": agreement, "local_accuracy": accuracy, "server_accuracy": None, "items": 4}


def test_every_check_passes_at_the_default_thresholds_on_a_perfect_server():
    checks = run_checks(_greedy(1.0, 0.01), _mc(1.0), Thresholds())
    assert [c["passed"] for c in checks] == [True, True, True, True]


def test_one_mismatched_prompt_fails_the_default_exact_match_rule():
    checks = {c["name"]: c for c in run_checks(_greedy(5 / 6), _mc(), Thresholds())}
    assert checks["greedy_exact_match"]["passed"] is False


def test_logprob_checks_are_skipped_not_failed_when_the_server_returns_none():
    checks = {c["name"]: c for c in run_checks(_greedy(1.0, None), _mc(None), Thresholds())}
    assert checks["logprobs"]["passed"] is None
    assert checks["mc_agreement"]["passed"] is None


def test_logprob_drift_beyond_the_tolerance_fails():
    checks = {c["name"]: c for c in run_checks(_greedy(1.0, 0.8), _mc(), Thresholds(logprob_tolerance=0.5))}
    assert checks["logprobs"]["passed"] is False


def test_shipped_prompts_and_task_are_well_formed():
    assert len(load_prompts(DEFAULT_PROMPTS)) >= 5
    rows = load_task(DEFAULT_TASK)
    assert len(rows) >= 10
    assert len({r["answer"] for r in rows}) > 1  # answers are not all in one position


def test_a_malformed_task_line_is_a_user_error_naming_the_line(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a"], "answer": 0}) + "\n"
                    + json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(UserError, match=r"task.jsonl:2 is not a multiple-choice item"):
        load_task(path)


def test_summary_fits_one_screen_and_shows_the_first_divergence():
    items = [{"prompt": f"p{i}", "reference": "abc", "served": "abd", "match": False,
              "first_divergence_char": 2, "first_divergence_token": 1, "max_abs_logprob_diff": None} for i in range(50)]
    report = {"passed": False, "export": "/x", "server": {"base_url": "http://s", "api": "completions",
              "logprobs": False, "model": None}, "checks": run_checks(_greedy(0.0), _mc(), Thresholds()),
              "greedy": {"items": items}}
    text = summary(report)
    assert text.splitlines()[0].startswith("validate FAILED")
    assert "first divergence on 'p0': token 1, char 2" in text
    assert len(text.splitlines()) <= 24


def test_tiny_export_refuses_a_non_empty_directory(tmp_path, capsys):
    from eval.cli import main

    (tmp_path / "keep.txt").write_text("x")
    assert main(["tiny-export", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_a_trailing_partial_utf8_character_is_not_a_mismatch():
    from eval.parity import first_difference, texts_match

    assert texts_match("gen of\ufffd", "gen of")  # transformers decodes the partial byte, a server holds it back
    assert texts_match("gen of", "gen of\ufffd")
    assert not texts_match("gen of\ufffd", "gen if")
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2


def test_auto_engine_serves_with_vllm_only_where_it_can():
    from eval.serve import choose_engine, vllm_dtype
    from trainer.errors import UserError

    qwen = {"model_type": "qwen3_moe", "head_dim": 32, "dtype": "float32"}
    assert choose_engine("auto", qwen, "cpu", "/venv/bin/python") == "vllm"
    assert choose_engine("auto", qwen, "cpu", None) == "transformers"  # vLLM not installed
    assert choose_engine("auto", {**qwen, "head_dim": 16}, "cpu", "/venv/bin/python") == "transformers"
    nemotron = {"model_type": "nemotron_h", "head_dim": 128}
    assert choose_engine("auto", nemotron, "cpu", "/venv/bin/python") == "transformers"
    assert choose_engine("auto", nemotron, "cuda", "/venv/bin/python") == "vllm"
    with pytest.raises(UserError, match="head_dim >= 32"):
        choose_engine("vllm", {**qwen, "head_dim": 16}, "cpu", "/venv/bin/python")
    with pytest.raises(UserError, match="nemotron_h"):
        choose_engine("vllm", nemotron, "cpu", "/venv/bin/python")
    assert vllm_dtype(qwen, "cpu") == "float32" and vllm_dtype({"dtype": "bfloat16"}, "cpu") == "bfloat16"
