"""Security: credentials never reach output or files, weights are never unpickled, remote code is off by default,
containers run as a non-root user."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from trainer.cli import main as moe
from trainer.config import load_recipe, resolve_path
from trainer.redact import REDACTED, redact, redact_tree, secret_values

REPO = Path(__file__).resolve().parents[2]
HF_TOKEN = "hf_TestOnlySecretValue0123456789"
WANDB_KEY = "wandb-test-only-key-abcdef0123"


def test_secret_environment_values_are_found_by_name_and_redacted():
    env = {"HF_TOKEN": HF_TOKEN, "WANDB_API_KEY": WANDB_KEY, "MY_SECRET": "s3cr3t-value", "PATH": "/usr/bin:/bin",
           "SHORT_TOKEN": "abc"}  # too short to be worth redacting
    assert set(secret_values(env)) == {HF_TOKEN, WANDB_KEY, "s3cr3t-value"}
    assert redact(f"url https://x:{HF_TOKEN}@hub", env) == f"url https://x:{REDACTED}@hub"
    tree = {"model": {"name_or_path": f"dir/{WANDB_KEY}", "tokenizer": "builtin:tokenizer"}, "n": 3, "l": [HF_TOKEN]}
    # by value, not by key name: a key that merely looks secret (model.tokenizer) keeps its value
    assert redact_tree(tree, env) == {"model": {"name_or_path": f"dir/{REDACTED}", "tokenizer": "builtin:tokenizer"},
                                      "n": 3, "l": [REDACTED]}


def test_tokens_in_the_environment_never_reach_output_logs_metrics_or_checkpoints(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY)
    # The worst case: a credential ends up inside a recipe value that is logged and saved (here, a path).
    data_dir = tmp_path / f"data-{HF_TOKEN}"
    data_dir.mkdir()
    shutil.copy(resolve_path("builtin:data/sft.jsonl"), data_dir / "sft.jsonl")
    run_dir = tmp_path / "run"
    code = moe(["train", "tiny-moe", "data.seq_len=64", "train.micro_batch_size=2", "train.max_steps=2",
                "checkpoint.every_steps=1", f"data.train_path={data_dir / 'sft.jsonl'}", f"output.dir={run_dir}",
                "--no-progress"])
    assert code == 0
    captured = capsys.readouterr()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "meta.json" for p in files) and any(p.suffix == ".safetensors" for p in files)
    for secret in (HF_TOKEN, WANDB_KEY):
        assert secret not in captured.out + captured.err
        leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert leaked == []
    assert REDACTED in (run_dir / "recipe.yaml").read_text()


def test_a_user_error_message_is_redacted(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    assert moe(["train", "tiny-moe", f"data.train_path=/nowhere/{HF_TOKEN}.jsonl", f"output.dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data file /nowhere/<redacted>.jsonl does not exist") and HF_TOKEN not in err


def test_no_code_path_unpickles_weights():
    """Every torch.load in the product code passes weights_only=True; weights are read from safetensors."""
    offenders = []
    for path in [*REPO.glob("trainer/**/*.py"), *REPO.glob("eval/**/*.py"), *REPO.glob("bench/**/*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"\btorch\.load\(|\bpickle\.loads?\(", line) and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert offenders == []
    build = (REPO / "trainer/build.py").read_text()
    assert '"use_safetensors"] = True' in build


def test_remote_code_is_off_unless_the_recipe_turns_it_on():
    assert load_recipe("tiny-moe").model.trust_remote_code is False
    assert load_recipe("tiny-moe", ["model.trust_remote_code=true"]).model.trust_remote_code is True


def test_every_image_runs_as_a_non_root_user():
    dockerfiles = [REPO / "Dockerfile", *REPO.glob("docker/*Dockerfile*")]
    assert len(dockerfiles) >= 2
    for dockerfile in dockerfiles:
        final_stage = dockerfile.read_text().split("\nFROM ")[-1]  # USER of the stage that ships
        users = re.findall(r"^USER\s+(\S+)", final_stage, flags=re.MULTILINE)
        assert users, f"{dockerfile.name}: the final stage sets no USER"
        name = users[-1].split(":")[0]
        assert name not in ("root", "0"), f"{dockerfile.name} runs as {users[-1]}"


def test_a_run_keeps_its_tokenizer_in_its_record_and_re_runs_from_its_own_recipe_yaml(tmp_path, monkeypatch, capsys):
    import json

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)  # a secret in the environment must not blank `model.tokenizer`
    run_dir = tmp_path / "run"
    assert moe(["train", "tiny-moe", "data.seq_len=64", "train.micro_batch_size=2", "train.max_steps=1",
                "output.export=false", f"output.dir={run_dir}", "--no-progress"]) == 0
    import yaml

    record = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert record["model"]["tokenizer"] == "builtin:tokenizer"
    meta = json.loads((run_dir / "checkpoints/step_00000001/meta.json").read_text())
    assert meta["recipe"]["model"]["tokenizer"] == "builtin:tokenizer"
    capsys.readouterr()
    assert moe(["train", str(run_dir / "recipe.yaml"), "train.max_steps=2", "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_a_bug_prints_its_traceback_with_credentials_redacted(monkeypatch, capsys):
    from trainer.cli import run_command

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)

    def buggy(args):
        raise RuntimeError(f"could not reach https://user:{HF_TOKEN}@hub.example")

    assert run_command(buggy, None) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: could not reach https://user:<redacted>@hub.example" in err
    assert HF_TOKEN not in err
