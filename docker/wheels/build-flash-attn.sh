#!/usr/bin/env bash
# Optionally build flash-attn (BUILD_FLASH_ATTN=1); otherwise leave OUT empty so the runtime installs nothing.
# Env: FLASH_ATTN_VERSION (TransformerEngine 2.6-2.9 use at most 2.8.1), FLASH_ATTN_CUDA_ARCHS, MAX_JOBS, OUT.
set -euo pipefail
: "${OUT:?}"
mkdir -p "$OUT"
if [ "${BUILD_FLASH_ATTN:-0}" != "1" ]; then
  echo "flash-attn not requested (BUILD_FLASH_ATTN=${BUILD_FLASH_ATTN:-0}); attention uses sdpa"
  exit 0
fi
: "${FLASH_ATTN_VERSION:?}"
export FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS="${FLASH_ATTN_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-8}"
pip wheel --no-build-isolation --no-deps --no-binary flash-attn --wheel-dir "$OUT" "flash-attn==${FLASH_ATTN_VERSION}"
ls -l "$OUT"
