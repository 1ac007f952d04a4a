#!/usr/bin/env bash
# Build TransformerEngine's wheel (core + PyTorch extension) from a release tag against the installed torch, when
# BUILD_TE=1; otherwise leave OUT empty so the runtime installs nothing (nothing in trainer/ calls TE).
# Env: TE_VERSION (tag without the v), NVTE_CUDA_ARCHS (e.g. "90;100"), MAX_JOBS, OUT (wheel folder).
set -euo pipefail
: "${OUT:?}"
mkdir -p "$OUT"
if [ "${BUILD_TE:-0}" != "1" ]; then
  echo "TransformerEngine not requested (BUILD_TE=${BUILD_TE:-0})"
  exit 0
fi
: "${TE_VERSION:?}" "${NVTE_CUDA_ARCHS:?}"
# Its build requirements (cmake >= 3.21, nvidia-mathdx) and the runtime imports of transformer_engine.pytorch
# (onnx, onnxscript, einops, pydantic) are in docker/requirements-train.txt: with --no-build-isolation and
# --no-deps pip would install none of them itself.
python - <<'PY'
import importlib.util, sys
modules = {"cmake": "cmake", "nvidia.mathdx": "nvidia-mathdx", "onnx": "onnx", "onnxscript": "onnxscript",
           "einops": "einops", "pydantic": "pydantic"}
missing = [package for module, package in modules.items() if importlib.util.find_spec(module) is None]
sys.exit(f"error: TransformerEngine's build needs {', '.join(missing)} (docker/requirements-train.txt)" if missing else 0)
PY
export NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS MAX_JOBS="${MAX_JOBS:-8}"
# No build isolation: the extension must compile against the image's torch, not a fresh one from PyPI.
# pip clones the tag with its submodules (cudnn-frontend, cutlass).
pip wheel --no-build-isolation --no-deps --wheel-dir "$OUT" \
  "transformer_engine[pytorch] @ git+https://github.com/NVIDIA/TransformerEngine.git@v${TE_VERSION}"
ls -l "$OUT"
