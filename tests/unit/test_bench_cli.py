"""The benchmark pipeline end to end on CPU: tiny job, 2 steps, native and ours, JSON + markdown + table out."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import compare, report
from trainer.flops import flops_per_token, matmul_params_per_token
from bench.jobs import JOBS, build_config
from trainer.cli import main as moe_main


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = compare.main(["--smoke", "--in-process", "--variants", "base,best", "--out", str(out)])
    assert code == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_smoke_run_writes_one_result_per_run_with_memory_config_and_loss(smoke_results):
    out, payload = smoke_results
    labels = [r["label"] for r in payload["results"]]
    assert labels == ["native", "ours[base]", "ours[best]", "ours[best](master-fp32)"]
    for result in payload["results"]:
        assert "error" not in result, result.get("traceback")
        assert result["tok_s_per_gpu"] > 0 and result["tflops_per_gpu"] > 0
        assert len(result["losses"]) == 3  # 1 warm-up + 2 measured
        assert result["config"]["num_hidden_layers"] == 2 and "peak_rss_gib" in result
    first_losses = {r["label"]: r["losses"][0] for r in payload["results"]}
    native = first_losses["native"]  # same data, same init seed -> the same first loss (compiled: fp32 reordering)
    assert all(abs(v - native) <= 1e-4 * abs(native) for v in first_losses.values()), first_losses
    assert payload["environment"]["torch"]
    assert (out / "results.md").read_text().startswith("| job | run |")


def test_report_table_has_ratios_against_native(smoke_results):
    _, payload = smoke_results
    rows = {r["label"]: r for r in report.rows(payload["results"])}
    assert rows["native"]["speedup"] == 1.0
    assert rows["ours[best]"]["speedup"] > 0
    assert "ours[best]" in report.summary_table(payload["results"])


def test_a_failing_run_is_recorded_and_does_not_stop_the_others(tmp_path):
    code = compare.main(["--smoke", "--in-process", "--ours-only", "--recipe", "none", "--variants",
                         "base,ac=full+compile=none+loss=liger", "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert "error" not in results[0]
    assert "liger_kernel is not importable" in results[1]["error"] or "tok_s_per_gpu" in results[1]


def test_moe_bench_subcommand_reaches_the_same_code(tmp_path, capsys):
    code = moe_main(["bench", "--smoke", "--in-process", "--native-only", "--out", str(tmp_path)])
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
    assert "unknown option 'fast-please'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_two_process_job_runs_both_layouts_of_ours_with_the_optimizer_in_backward(tmp_path):
    code = compare.main(["--jobs", "smoke-ep2", "--device", "cpu", "--ours-only", "--recipe", "none",
                         "--ours-layouts", "ep,fsdp,zero2", "--variants", "opt-in-bwd", "--steps", "1", "--warmup", "1",
                         "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["label"] for r in results] == ["ours[ep:opt-in-bwd]", "ours[fsdp:opt-in-bwd]", "ours[zero2:opt-in-bwd]"]
    for result in results:
        assert "error" not in result, result.get("log_tail")
        assert not any("fused AdamW" in note for note in result["notes"]), result["notes"]
    assert abs(results[0]["loss_last"] - results[1]["loss_last"]) <= 1e-4 * abs(results[1]["loss_last"])


def test_two_process_job_runs_the_replicated_layouts_with_split_experts_like_whole_ones(tmp_path):
    code = compare.main(["--jobs", "smoke-ep2", "--device", "cpu", "--ours-only", "--recipe", "none",
                         "--ours-layouts", "replicate-sharded,replicate-ep,replicate-ep-allgather", "--variants",
                         "opt-in-bwd", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    for result in results:
        assert "error" not in result, result.get("log_tail")
    whole, *splits = results
    for split, dispatcher in zip(splits, ["alltoall", "allgather"]):
        assert any(f"expert-parallel dispatcher: {dispatcher}" in note for note in split["notes"]), split["notes"]
        assert abs(whole["loss_last"] - split["loss_last"]) <= 1e-4 * abs(whole["loss_last"])


def test_speedups_are_against_the_fastest_native_layout():
    base = {"job": "B2", "tflops_per_gpu": 1.0, "peak_gib": 1.0, "loss_last": 1.0}
    results = [dict(base, label="native[fsdp]", tok_s_per_gpu=100.0), dict(base, label="native[ep]", tok_s_per_gpu=200.0),
               dict(base, label="ours[fsdp:best]", tok_s_per_gpu=300.0)]
    rows = {r["label"]: r for r in report.rows(results)}
    assert rows["ours[fsdp:best]"]["speedup"] == 1.5 and rows["native[fsdp]"]["speedup"] == 0.5


def test_report_keeps_only_the_chosen_runs(tmp_path, capsys):
    base = {"job": "B1-bs1", "tflops_per_gpu": 1.0, "peak_gib": 1.0, "loss_last": 1.0}
    results = [dict(base, label="native", tok_s_per_gpu=100.0), dict(base, label="ours[a]", tok_s_per_gpu=150.0),
               dict(base, label="ours[b]", tok_s_per_gpu=200.0)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"results": results}))
    assert report.main([str(path), "--runs", "native,ours[b]"]) == 0
    out = capsys.readouterr().out
    assert "ours[b]" in out and "ours[a]" not in out and "| B1-bs1 | native |" in out


def test_one_gpu_layouts_runs_split_experts_in_a_one_rank_group_like_the_plain_model(tmp_path):
    out = tmp_path / "layouts.json"
    proc = subprocess.run([sys.executable, "bench/one_gpu_layouts.py", "--job", "smoke", "--variant", "opt-in-bwd",
                           "--modes", "plain,allgather", "--row-sum", "torch", "--steps", "1", "--warmup", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plain, allgather = json.loads(out.read_text())["rows"]
    assert (plain["mode"], allgather["mode"]) == ("plain", "allgather")
    assert abs(plain["loss_last"] - allgather["loss_last"]) <= 1e-5 * abs(plain["loss_last"])
