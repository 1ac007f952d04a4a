"""`make demo` (python -m trainer.demo): train, export, reload with plain transformers, generate; exit 0."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_trains_exports_reloads_and_generates(tmp_path):
    # Fewer steps than the default demo to keep the suite fast; the loss still has to fall clearly.
    result = subprocess.run(
        [sys.executable, "-m", "trainer.demo", f"output.dir={tmp_path / 'demo'}", "train.max_steps=120",
         "checkpoint.every_steps=0"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = re.search(r"loss: first \d+ steps ([\d.]+) -> last \d+ steps ([\d.]+)", result.stdout)
    first, last = float(summary.group(1)), float(summary.group(2))
    assert last < 0.5 * first
    assert "export reloaded with AutoModelForCausalLM" in result.stdout
    assert re.search(r"assistant: \S", result.stdout)  # a non-empty greedy reply
    export = tmp_path / "demo" / "export"
    assert (export / "model.safetensors").is_file() and (export / "tokenizer.json").is_file()

    # The export needs nothing from this project: a fresh interpreter with only transformers loads and runs it.
    check = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "x = t.apply_chat_template([{'role': 'user', 'content': 'Capital of France?'}], add_generation_prompt=True, "
        "return_tensors='pt', return_dict=True); print(t.decode(m.generate(**x, max_new_tokens=8, do_sample=False)[0]))"
    )
    plain = subprocess.run([sys.executable, "-c", check, str(export)], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert "assistant" in plain.stdout
