"""docker/wheels/limit-gencode.py narrows a setup.py's hard-coded nvcc -gencode list to TORCH_CUDA_ARCH_LIST."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "docker" / "wheels" / "limit-gencode.py"
SETUP = """import os
cc_flag = []
if True:
    for arch in ("53", "70", "80", "87", "90", "100", "120"):
        cc_flag.append("-gencode")
        cc_flag.append(f"arch=compute_{arch},code=sm_{arch}")
    cc_flag.append("--threads=4")
    ext_modules = []
    ext_modules.append(cc_flag)
print(ext_modules[0])
"""


def _run(*args: str, arch: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    if arch is not None:
        env["TORCH_CUDA_ARCH_LIST"] = arch
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=60)


def test_only_the_requested_architectures_reach_nvcc(tmp_path):
    setup = tmp_path / "setup.py"
    setup.write_text(SETUP)
    assert _run(str(SCRIPT), str(setup), arch="9.0;10.0").returncode == 0
    flags = _run(str(setup), arch="9.0;10.0").stdout.strip().splitlines()[-1]
    assert flags == str(["-gencode", "arch=compute_90,code=sm_90", "-gencode", "arch=compute_100,code=sm_100",
                         "--threads=4"])


def test_a_setup_py_of_another_shape_is_refused_in_one_line(tmp_path):
    setup = tmp_path / "setup.py"
    setup.write_text("from setuptools import setup\nsetup(name='x')\n")
    result = _run(str(SCRIPT), str(setup), arch="9.0")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "limit-gencode.py" in result.stderr
