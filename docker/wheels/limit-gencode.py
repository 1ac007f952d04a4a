"""Restrict a setup.py's hard-coded nvcc `-gencode` pairs to the architectures in TORCH_CUDA_ARCH_LIST.

mamba-ssm and causal-conv1d build every kernel for eight or more architectures (sm53 ... sm120) whatever
TORCH_CUDA_ARCH_LIST says, which multiplies the build time and the wheel size for GPUs this image never meets.
This inserts a filter on their `cc_flag` list right before the first extension is declared, so only the
requested `-gencode arch=compute_XX,code=sm_XX` pairs reach nvcc. It fails loudly if the upstream file no longer
has the shape it edits, rather than building everything silently.

    python limit-gencode.py path/to/setup.py        (TORCH_CUDA_ARCH_LIST="9.0;10.0" in the environment)
"""

import os
import sys
from pathlib import Path

FILTER = '''{indent}_moe_keep = {{a.strip().replace(".", "") for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").split()}}
{indent}_moe_flags = []
{indent}for _moe_flag in cc_flag:
{indent}    if _moe_flag.startswith("arch=compute_") and _moe_flag.split("code=sm_")[-1] not in _moe_keep:
{indent}        _moe_flags.pop()  # its "-gencode"
{indent}        continue
{indent}    _moe_flags.append(_moe_flag)
{indent}cc_flag[:] = _moe_flags
{indent}print("nvcc -gencode limited to", [f for f in cc_flag if f.startswith("arch=")])
'''


def main(path: str) -> int:
    setup = Path(path)
    lines = setup.read_text().splitlines(keepends=True)
    marker = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ext_modules.append(")), None)
    if marker is None or not any("cc_flag" in line for line in lines[:marker]):
        print(f"error: {setup} has no cc_flag list before ext_modules.append(: its build changed; update "
              "docker/wheels/limit-gencode.py", file=sys.stderr)
        return 2
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        print("error: TORCH_CUDA_ARCH_LIST is not set (e.g. '9.0;10.0')", file=sys.stderr)
        return 2
    indent = lines[marker][: len(lines[marker]) - len(lines[marker].lstrip())]
    lines.insert(marker, FILTER.format(indent=indent))
    setup.write_text("".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
