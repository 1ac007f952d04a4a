#!/usr/bin/env bash
# Build TransformerEngine's wheel (core + PyTorch extension) from a release tag against the installed torch.
# Env: TE_VERSION (tag without the v), NVTE_CUDA_ARCHS (e.g. "90" or "90;100"), MAX_JOBS, OUT (wheel folder).
set -euo pipefail
: "${TE_VERSION:?}" "${NVTE_CUDA_ARCHS:?}" "${OUT:?}"
export NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS MAX_JOBS="${MAX_JOBS:-8}"
# No build isolation: the extension must compile against the image's torch, not a fresh one from PyPI.
# pip clones the tag with its submodules (cudnn-frontend, cutlass).
pip wheel --no-build-isolation --no-deps --wheel-dir "$OUT" \
  "transformer_engine[pytorch] @ git+https://github.com/NVIDIA/TransformerEngine.git@v${TE_VERSION}"
ls -l "$OUT"
