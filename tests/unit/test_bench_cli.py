"""The benchmark pipeline end to end on CPU: tiny job, native and `moe train` rows, JSON + markdown + table out.

The "ours" rows must be real `moe train` runs: each names the run directory it wrote, and its numbers are the ones
in that directory's metrics.jsonl.
"""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench import compare, report
from bench.jobs import JOBS, build_config
from trainer.cli import main as moe_main
from trainer.flops import flops_per_token, matmul_params_per_token
from trainer.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = compare.main(["--smoke", "--variants", "default; eager: perf.compile=off perf.fused_ce=off",
                         "--steps", "2", "--warmup", "1", "--out", str(out)])
    assert code == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_smoke_run_writes_one_result_per_run(smoke_results):
    _, payload = smoke_results
    assert [r["label"] for r in payload["results"]] == ["native", "ours[default]", "ours[eager]"]
    for result in payload["results"]:
        assert "error" not in result, result.get("log_tail") or result.get("traceback")
        assert result["tok_s_per_gpu"] > 0 and result["tflops_per_gpu"] > 0
    assert payload["environment"]["torch"]


def test_ours_rows_are_moe_train_run_directories_and_take_their_numbers_from_its_metrics(smoke_results):
    _, payload = smoke_results
    for result in payload["results"][1:]:
        records = read_metrics(result["run_dir"])
        assert [r["step"] for r in records] == [1, 2, 3]  # warm-up + measured steps, all written by moe train
        assert result["tok_s_per_gpu"] == statistics.median(r["tokens_per_s"] for r in records[1:])
        saved = yaml.safe_load(open(result["recipe"]))
        assert saved["train"]["max_steps"] == 3 and saved["output"]["dir"] == result["run_dir"]
    eager = yaml.safe_load(open(payload["results"][2]["recipe"]))
    assert eager["perf"]["compile"] == "off" and eager["perf"]["fused_ce"] == "off"


def test_native_and_ours_train_the_same_model_on_the_same_batches(smoke_results):
    _, payload = smoke_results
    native = payload["results"][0]["losses"]
    # Same data, same init (both sides build the weights in the recipe's dtype, fp32 on CPU), the same step: every
    # step's loss agrees. Tolerance 1e-4 relative: our kernels reorder sums, and a router whose top-k logits are
    # nearly tied may pick another expert for a token (measured over 25 steps: at most 9.4e-5 absolute at ~6.9).
    for result in payload["results"][1:]:
        assert len(result["losses"]) == len(native) == 3
        for ours, theirs in zip(result["losses"], native):
            assert abs(ours - theirs) <= 1e-4 * abs(theirs), (result["label"], result["losses"], native)


def test_report_table_has_ratios_against_native(smoke_results):
    out, payload = smoke_results
    rows = {r["label"]: r for r in report.rows(payload["results"])}
    assert rows["native"]["speedup"] == 1.0 and rows["ours[default]"]["speedup"] > 0
    assert "ours[default]" in report.summary_table(payload["results"])
    assert (out / "results.md").read_text().startswith("| job | run |")


def test_moe_bench_subcommand_reaches_the_same_code(tmp_path, capsys):
    code = moe_main(["bench", "--smoke", "--native-only", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    assert code == 0
    assert "native" in capsys.readouterr().out
    assert (tmp_path / "results.json").exists()


def test_flops_count_only_top_k_experts_and_half_of_causal_attention():
    config = build_config(JOBS["B1-bs1"])
    per_layer_attention = 2048 * 4096 + 2 * 2048 * 512 + 4096 * 2048
    per_layer_moe = 2048 * 128 + 8 * 3 * 2048 * 768
    assert matmul_params_per_token(config) == 12 * (per_layer_attention + per_layer_moe) + 2048 * 151936
    attention = 6 * 12 * 32 * 128 * 4096
    assert flops_per_token(config, 4096) == 6 * matmul_params_per_token(config) + attention


def test_nemotron_flops_count_mamba_projections_and_state_terms():
    config = build_config(JOBS["B3"])
    assert [k for k in config.layers_block_type] == ["linear_attention", "moe", "linear_attention", "moe",
                                                     "full_attention", "moe"]
    flops = flops_per_token(config, 4096)
    state_terms = 12 * 2 * 64 * 64 * 128
    attention = 6 * 1 * 32 * 128 * 4096
    assert flops == 6 * matmul_params_per_token(config) + attention + state_terms


def test_unknown_job_or_variant_is_a_one_line_error_before_anything_runs(tmp_path, capsys):
    assert compare.main(["--jobs", "B9", "--out", str(tmp_path / "a")]) == 2
    assert "choose from B1-bs1" in capsys.readouterr().err
    assert moe_main(["bench", "--smoke", "--variants", "fast-please", "--out", str(tmp_path / "b")]) == 2
    assert "unknown variant 'fast-please'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_variant_is_a_named_list_of_recipe_overrides():
    assert compare.parse_variants("default; overlap; ac: parallel.activation_checkpointing=attention") == [
        ("default", []), ("overlap", ["perf.optimizer=overlap", "optim.max_grad_norm=0"]),
        ("ac", ["parallel.activation_checkpointing=attention"])]


def test_a_refused_recipe_costs_one_row_with_moe_trains_error_line(tmp_path):
    code = compare.main(["--smoke", "--ours-only", "--variants", "bad: perf.optimizer=overlap", "--steps", "1",
                         "--warmup", "1", "--out", str(tmp_path)])
    assert code == 0
    (result,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert "optim.max_grad_norm=0" in result["error"]


def test_job_overrides_reach_the_recipe_and_name_the_row(tmp_path):
    code = compare.main(["--smoke", "--ours-only", "--set", "optim.max_grad_norm=0", "--variants", "default",
                         "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    assert code == 0
    (result,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert "error" not in result, result.get("log_tail")
    assert result["job_set"] == "optim.max_grad_norm=0"
    assert yaml.safe_load(open(result["recipe"]))["optim"]["max_grad_norm"] == 0


def test_two_process_job_trains_with_expert_parallelism_through_moe_train(tmp_path):
    code = compare.main(["--jobs", "smoke-ep2", "--ours-only", "--variants", "default", "--steps", "1",
                         "--warmup", "1", "--out", str(tmp_path)])
    assert code == 0
    (result,) = json.loads((tmp_path / "results.json").read_text())["results"]
    assert "error" not in result, result.get("log_tail")
    assert yaml.safe_load(open(result["recipe"]))["parallel"]["ep_size"] == 2


def test_speedups_are_against_the_fastest_native_layout():
    base = {"job": "B2", "tflops_per_gpu": 1.0, "peak_gib": 1.0, "loss_last": 1.0}
    results = [dict(base, label="native[fsdp]", tok_s_per_gpu=100.0), dict(base, label="native[ep]", tok_s_per_gpu=200.0),
               dict(base, label="ours[default]", tok_s_per_gpu=300.0)]
    rows = {r["label"]: r for r in report.rows(results)}
    assert rows["ours[default]"]["speedup"] == 1.5 and rows["native[fsdp]"]["speedup"] == 0.5


def test_a_job_run_with_overrides_on_both_sides_is_its_own_job_with_its_own_native():
    base = {"job": "B1-bs4", "tflops_per_gpu": 1.0, "peak_gib": 1.0, "loss_last": 1.0}
    noclip = dict(base, job_set="optim.max_grad_norm=0")
    results = [dict(base, label="native", tok_s_per_gpu=100.0), dict(base, label="ours[default]", tok_s_per_gpu=200.0),
               dict(noclip, label="native", tok_s_per_gpu=80.0), dict(noclip, label="ours[overlap]", tok_s_per_gpu=200.0)]
    rows = {(r["job"], r["label"]): r for r in report.rows(results)}
    assert rows[("B1-bs4", "ours[default]")]["speedup"] == 2.0
    assert rows[("B1-bs4 (optim.max_grad_norm=0)", "ours[overlap]")]["speedup"] == 2.5
    assert rows[("B1-bs4 (optim.max_grad_norm=0)", "native")]["runs"] == 1


def test_report_keeps_only_the_chosen_runs(tmp_path, capsys):
    base = {"job": "B1-bs1", "tflops_per_gpu": 1.0, "peak_gib": 1.0, "loss_last": 1.0}
    results = [dict(base, label="native", tok_s_per_gpu=100.0), dict(base, label="ours[a]", tok_s_per_gpu=150.0),
               dict(base, label="ours[b]", tok_s_per_gpu=200.0)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"results": results}))
    assert report.main([str(path), "--runs", "native,ours[b]"]) == 0
    out = capsys.readouterr().out
    assert "ours[b]" in out and "ours[a]" not in out and "| B1-bs1 | native |" in out




def test_lora_job_runs_peft_natively_and_moe_train_on_the_same_recipe(tmp_path):
    code = compare.main(["--jobs", "smoke-lora", "--variants", "default", "--steps", "2", "--warmup", "1",
                         "--out", str(tmp_path)])
    assert code == 0
    native, ours = json.loads((tmp_path / "results.json").read_text())["results"]
    assert "error" not in native and "error" not in ours, (native.get("traceback"), ours.get("log_tail"))
    assert any("native LoRA: PEFT get_peft_model" in note for note in native["notes"])
    assert yaml.safe_load(open(ours["recipe"]))["lora"]["enabled"] is True
    # same base init, same batches, adapters starting at zero delta: the same first loss; later ones track
    assert abs(ours["losses"][0] - native["losses"][0]) <= 1e-4 * abs(native["losses"][0])
    assert ours["losses"][-1] == pytest.approx(native["losses"][-1], rel=1e-3)
    # the run saved its random-init base, and the benchmark removed it once the numbers were read
    assert ours["weights_removed_bytes"] > 0
    assert not list(Path(ours["run_dir"]).rglob("*.safetensors"))
    assert (Path(ours["run_dir"]) / "metrics.jsonl").is_file()


def _processes_mentioning(text: str) -> list[str]:
    found = subprocess.run(["pgrep", "-af", text], capture_output=True, text=True).stdout.splitlines()
    return [line for line in found if "pgrep" not in line]


@pytest.mark.skipif(shutil.which("pgrep") is None, reason="needs pgrep")
def test_sigterm_kills_the_run_in_progress_with_the_benchmark(tmp_path):
    # A job budget's `timeout` sends SIGTERM to bench.compare: its `moe train` child must not live on (it would share
    # the GPU with the next run and corrupt that measurement).
    out = tmp_path / "sigterm-bench"
    proc = subprocess.Popen([sys.executable, "-m", "bench.compare", "--smoke", "--ours-only", "--steps", "500",
                             "--warmup", "1", "--out", str(out)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not any("trainer.cli" in line for line in _processes_mentioning(str(out))):
        assert proc.poll() is None and time.monotonic() < deadline, "the moe train run never started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert _processes_mentioning(str(out)) == []  # gone by the time the benchmark has exited, not eventually
