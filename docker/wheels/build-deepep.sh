#!/usr/bin/env bash
# Build DeepEP v1 (intranode NVLink + internode NVSHMEM kernels) at a pinned tag against the installed torch.
# Env: DEEPEP_REF (tag or commit; v1.2.1 is the last v1 API), TORCH_CUDA_ARCH_LIST (9.0), OUT (wheel folder).
# HEAD of DeepEP is "EPv2" (needs torch >= 2.10): never build an unpinned checkout.
set -euo pipefail
: "${DEEPEP_REF:?}" "${OUT:?}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
src="$(mktemp -d)"
git clone --filter=blob:none https://github.com/deepseek-ai/DeepEP.git "$src"
git -C "$src" checkout --quiet "$DEEPEP_REF"
# setup.py finds NVSHMEM through the nvidia-nvshmem-cu12 wheel (installed from requirements-train.txt) and
# rpaths to it; the runtime stage installs the same wheel at the same path. NVSHMEM's headers include
# <cuda/std/tuple>, which CUDA 13 moved under include/cccl (harmless on 12.x).
export CPLUS_INCLUDE_PATH="/usr/local/cuda/include/cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
export NVCC_APPEND_FLAGS="-I/usr/local/cuda/include/cccl ${NVCC_APPEND_FLAGS:-}"
(cd "$src" && pip wheel --no-build-isolation --no-deps --wheel-dir "$OUT" .)
rm -rf "$src"
ls -l "$OUT"
