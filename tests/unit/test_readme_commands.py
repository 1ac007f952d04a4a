"""The README's `moe train` / torchrun commands can work as written: each recipe loads with its overrides, its mesh
fits the number of processes the command starts, and where the planner knows the model (shipped configs), the
layout fits the GPUs the README names (80 GiB each)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from trainer.config import load_recipe
from trainer.planner import check_fits

REPO = Path(__file__).resolve().parents[2]
GPU_GIB = 80.0


def _commands() -> list[list[str]]:
    block = re.search(r"## Using it on GPUs\n+```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line.split("#")[0]) for line in lines]
    return [c for c in commands if c and ("train" in c and (c[0] == "moe" or c[0] == "torchrun"))]


def _processes_and_job(command: list[str]) -> tuple[int, list[str]]:
    if command[0] == "moe":
        return 1, command[command.index("train") + 1:]
    options = dict(zip(command, command[1:]))
    processes = int(options.get("--nproc-per-node", 1)) * int(options.get("--nnodes", 1))
    return processes, command[command.index("train") + 1:]


def test_the_readme_has_the_commands():
    assert len(_commands()) >= 4


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c)[:60])
def test_a_readme_training_command_can_work_as_written(command):
    from trainer.models.base import num_experts
    from trainer.parallel.config import ParallelConfig
    from trainer.parallel.mesh import mesh_sizes
    from trainer.planner.model_source import load_model_config

    processes, (recipe_name, *overrides) = _processes_and_job(command)
    recipe = load_recipe(recipe_name, overrides)
    if processes == 1:
        assert recipe.parallel.ep_size == 1, "one process cannot run expert parallelism"
    config = load_model_config(recipe.model.name_or_path, recipe.model.config_overrides)
    mesh_sizes(ParallelConfig.from_any(recipe.parallel), processes, num_experts(_Attrs(config)))
    check_fits(recipe, None, world_size=processes, gpu_mem_gib=GPU_GIB)  # UserError if it cannot fit


class _Attrs:
    """A config dict read like a config object."""

    def __init__(self, values: dict):
        self.__dict__.update(values)
