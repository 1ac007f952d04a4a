#!/usr/bin/env bash
# Build DeepEP v1.2.1 (normal + low-latency kernels, intranode and NVSHMEM internode) against the installed torch.
#
#   bench/device/build_deepep.sh [SOURCE] [WHEEL_DIR]
#
# SOURCE: the DeepEP-v1.2.1 source directory or .tar.gz (default: .device/src/DeepEP-v1.2.1.tar.gz).
# WHEEL_DIR: when given, build a wheel there instead of installing it.
# Needs: nvcc (CUDA toolkit), torch with CUDA, and the NVSHMEM wheel (`pip install nvidia-nvshmem-cu13`, or -cu12
# for CUDA 12). Hopper: TORCH_CUDA_ARCH_LIST=9.0 (override with the environment variable).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SOURCE="${1:-$ROOT/.device/src/DeepEP-v1.2.1.tar.gz}"
WHEEL_DIR="${2:-}"
PYTHON="${PYTHON:-python}"

command -v nvcc >/dev/null || { echo "error: nvcc not found; install the CUDA toolkit or put it on PATH" >&2; exit 2; }
CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}"

if [[ -f "$SOURCE" ]]; then
  WORK="$(mktemp -d)"
  trap 'rm -rf "$WORK"' EXIT
  tar xzf "$SOURCE" -C "$WORK"
  SOURCE="$(find "$WORK" -mindepth 1 -maxdepth 1 -type d | head -n1)"
fi
[[ -f "$SOURCE/setup.py" ]] || { echo "error: $SOURCE is not a DeepEP source tree" >&2; exit 2; }

# NVSHMEM from the pip wheel (nvidia-nvshmem-cu13 / -cu12); setup.py would also find it, the explicit path is logged.
NVSHMEM_DIR="${NVSHMEM_DIR:-$("$PYTHON" -c 'import importlib.util as u; s = u.find_spec("nvidia.nvshmem"); print(s.submodule_search_locations[0] if s else "")')}"
if [[ -z "$NVSHMEM_DIR" ]]; then
  echo "warning: NVSHMEM not found (pip install nvidia-nvshmem-cu13): building intranode-only DeepEP" >&2
else
  export NVSHMEM_DIR
  # The wheel ships only the versioned host library; the linker wants the plain name.
  if [[ ! -e "$NVSHMEM_DIR/lib/libnvshmem_host.so" ]]; then
    host_lib="$(ls "$NVSHMEM_DIR"/lib/libnvshmem_host.so.* 2>/dev/null | head -n1 || true)"
    [[ -n "$host_lib" ]] && ln -sf "$(basename "$host_lib")" "$NVSHMEM_DIR/lib/libnvshmem_host.so"
  fi
fi

# NVSHMEM headers include <cuda/std/tuple>: CUDA's CCCL headers must be on both the host and the device include path.
CCCL="$CUDA_HOME/include/cccl"
if [[ -d "$CCCL" ]]; then
  export CPATH="$CCCL${CPATH:+:$CPATH}"
  export CPLUS_INCLUDE_PATH="$CCCL${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
  export NVCC_APPEND_FLAGS="-I$CCCL ${NVCC_APPEND_FLAGS:-}"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

echo "building DeepEP from $SOURCE (CUDA_HOME=$CUDA_HOME, NVSHMEM_DIR=${NVSHMEM_DIR:-none}, arch $TORCH_CUDA_ARCH_LIST)"
cd "$SOURCE"
if [[ -n "$WHEEL_DIR" ]]; then
  mkdir -p "$WHEEL_DIR"
  "$PYTHON" -m pip wheel --no-build-isolation --no-deps -w "$WHEEL_DIR" .
else
  "$PYTHON" -m pip install --no-build-isolation --no-deps .
  cd /
  "$PYTHON" -c 'import deep_ep; print("deep_ep imports; sm90 kernels:", deep_ep.Buffer.is_sm90_compiled())'
fi
