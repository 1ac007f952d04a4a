"""`check_fits` refuses a layout that cannot fit with one line naming the best alternative; `moe plan` prints it."""

import pytest

from trainer.cli import main
from trainer.config import load_recipe
from trainer.errors import UserError
from trainer.planner import check_fits, load_model_config
from trainer.planner.fit_check import SKIP_ENV

QWEN_TOO_BIG = ["parallel.ep_size=1", "train.micro_batch_size=8", "parallel.activation_checkpointing=none"]


def qwen_recipe(*overrides):
    return load_recipe("qwen3-30b-a3b", list(overrides))


def test_a_layout_that_fits_passes_silently():
    assert check_fits(qwen_recipe(), None, world_size=8, gpu_mem_gib=139.8) is None


def test_a_layout_that_cannot_fit_is_refused_with_the_best_alternative_on_one_line():
    with pytest.raises(UserError) as err:
        check_fits(qwen_recipe(*QWEN_TOO_BIG), None, world_size=8, gpu_mem_gib=79.1)
    message = str(err.value)
    assert "\n" not in message
    assert "layout ep=1 shard=8 mb=8 ckpt=none needs about" in message
    assert "use parallel.ep_size=" in message and "train.micro_batch_size=" in message
    assert "parallel.check_memory=false" in message  # the recipe key that overrides the refusal


def test_the_alternative_offered_itself_fits():
    with pytest.raises(UserError) as err:
        check_fits(qwen_recipe(*QWEN_TOO_BIG), None, world_size=8, gpu_mem_gib=79.1)
    offered = str(err.value).split("use ", 1)[1].split(" (about")[0].split()
    assert check_fits(qwen_recipe(*offered), None, world_size=8, gpu_mem_gib=79.1) is None


def test_the_check_takes_a_model_config_instead_of_the_recipe_model():
    one_gpu = ["parallel.ep_size=1", "parallel.activation_checkpointing=none"]
    with pytest.raises(UserError):
        check_fits(qwen_recipe(*one_gpu), None, world_size=1, gpu_mem_gib=139.8)
    small = load_model_config("qwen3-30b-a3b", {"num_hidden_layers": 2})
    assert check_fits(qwen_recipe(*one_gpu), small, world_size=1, gpu_mem_gib=139.8) is None


def test_a_mesh_impossible_on_this_many_gpus_is_refused():
    with pytest.raises(UserError, match="impossible on 2 GPUs: ep_size 8 does not divide dp_shard 2"):
        check_fits(qwen_recipe(), None, world_size=2, gpu_mem_gib=139.8)


def test_when_nothing_fits_the_message_says_so():
    with pytest.raises(UserError, match="no layout fits on 1 GPUs"):
        check_fits(qwen_recipe("parallel.ep_size=1"), None, world_size=1, gpu_mem_gib=24.0)


def test_the_refusal_can_be_overridden(monkeypatch):
    monkeypatch.setenv(SKIP_ENV, "1")
    assert check_fits(qwen_recipe(*QWEN_TOO_BIG), None, world_size=8, gpu_mem_gib=79.1) is None


def test_moe_plan_prints_the_ranked_table(capsys):
    assert main(["plan", "qwen3-30b-a3b", "--gpus", "8", "--gpu", "H100-80GB", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "layouts that fit, fastest first" in out
    assert "params  grads optimi activa   loss   comm worksp   peak" in out
    assert "best: parallel.ep_size=" in out


def test_moe_plan_exits_2_when_nothing_fits(capsys):
    assert main(["plan", "qwen3-30b-a3b", "--gpus", "1", "--gpu-mem", "24"]) == 2
    assert "error: no layout fits" in capsys.readouterr().err


def test_moe_plan_writes_json(tmp_path):
    out = tmp_path / "plan.json"
    assert main(["plan", "qwen3-30b-a3b", "model.config_overrides.num_hidden_layers=4", "--gpus", "2",
                 "--gpu", "H200-141GB", "--json", str(out)]) == 0
    import json

    table = json.loads(out.read_text())
    assert table["world_size"] == 2 and table["candidates"][0]["fits"]
