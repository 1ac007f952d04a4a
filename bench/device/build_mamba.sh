#!/usr/bin/env bash
# Build the two wheels Nemotron-H's fast Mamba2 path needs, against the installed torch:
#   - causal-conv1d: the CUDA extension, compiled for sm_90 only (Hopper; its setup.py hard-codes sm_75 ... sm_121,
#     which multiplies the compile time for nothing on an H200);
#   - mamba-ssm: Python + Triton only (MAMBA_SKIP_CUDA_BUILD=TRUE). That skips the CUDA Mamba1 extension
#     (selective_scan_cuda), which Nemotron-H does not use; trainer/kernels/mamba.py loads the Triton SSD kernels
#     without mamba_ssm's package __init__, which would import it.
#
#   bench/device/build_mamba.sh CAUSAL_CONV1D_SRC MAMBA_SRC WHEEL_DIR
#
# *_SRC: a source directory or a .tar.gz of one (e.g. .device/src/causal-conv1d.tar.gz, .device/src/mamba-v2.3.0.tar.gz).
# Sources are copied before patching: the caller's trees are never modified.
# Then: pip install --no-deps WHEEL_DIR/*.whl   (einops is mamba-ssm's one runtime dependency besides torch/triton).
# Needs nvcc (CUDA toolkit matching torch's CUDA major), torch with CUDA, ninja for a parallel build.
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: $0 CAUSAL_CONV1D_SRC MAMBA_SRC WHEEL_DIR" >&2
  exit 2
fi
PYTHON="${PYTHON:-python}"
command -v nvcc >/dev/null || { echo "error: nvcc not found; install the CUDA toolkit or put it on PATH" >&2; exit 2; }
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$3"
WHEEL_DIR="$(cd "$3" && pwd)"

# A private copy of a source tree (directory or .tar.gz) under $WORK/$2; prints its path.
copy_source() {
  local source="$1" name="$2"
  mkdir -p "$WORK/$name"
  if [[ -f "$source" ]]; then
    tar xzf "$source" -C "$WORK/$name"
  elif [[ -d "$source" ]]; then
    cp -r "$source/." "$WORK/$name/"
  else
    echo "error: $source is neither a directory nor a .tar.gz" >&2
    exit 2
  fi
  local setup
  setup="$(find "$WORK/$name" -maxdepth 2 -name setup.py | head -n1)"
  [[ -n "$setup" ]] || { echo "error: no setup.py in $source" >&2; exit 2; }
  dirname "$setup"
}

seconds() { date +%s; }
START=$(seconds)
echo "torch: $("$PYTHON" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
echo "nvcc:  $(nvcc --version | tail -n1)   arch: sm_90   jobs: $MAX_JOBS"

# --- causal-conv1d (CUDA, sm_90 only) ---
T0=$(seconds)
CONV="$(copy_source "$1" causal-conv1d)"
# Each target is a pair of lines: cc_flag.append("-gencode") / cc_flag.append("arch=compute_XX,code=sm_XX").
# Replace every pair that is not sm_90 with `pass` (keeps the `if` blocks around them valid Python).
sed -i -E '/cc_flag\.append\("-gencode"\)/{N;/compute_90,code=sm_90/!s/^([[:space:]]*).*\n.*$/\1pass  # sm_90 only/}' \
  "$CONV/setup.py"
targets="$(grep -c 'arch=compute_' "$CONV/setup.py" || true)"
grep -q 'arch=compute_90,code=sm_90' "$CONV/setup.py" && [[ "$targets" == "1" ]] \
  || { echo "error: could not limit causal-conv1d's setup.py to sm_90 ($targets targets left)" >&2; exit 1; }
(cd "$CONV" && CAUSAL_CONV1D_FORCE_BUILD=TRUE "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" .)
T1=$(seconds)
echo "causal-conv1d wheel built in $((T1 - T0)) s"

# --- mamba-ssm (Python + Triton only) ---
MAMBA="$(copy_source "$2" mamba)"
(cd "$MAMBA" && MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE \
  "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" .)
T2=$(seconds)
echo "mamba-ssm wheel built in $((T2 - T1)) s"

ls -l "$WHEEL_DIR"/causal_conv1d-*.whl "$WHEEL_DIR"/mamba_ssm-*.whl
echo "total $((T2 - START)) s"
echo "install: $PYTHON -m pip install --no-deps $WHEEL_DIR/causal_conv1d-*.whl $WHEEL_DIR/mamba_ssm-*.whl einops"
echo "check:   $PYTHON -c 'from trainer.kernels import mamba; print(mamba.status())'"
