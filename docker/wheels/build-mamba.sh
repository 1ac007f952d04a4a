#!/usr/bin/env bash
# Build causal-conv1d and mamba-ssm from their sdists against the installed torch (Nemotron-H's fast path).
# Env: CAUSAL_CONV1D_VERSION, MAMBA_VERSION, MAX_JOBS, OUT (wheel folder).
set -euo pipefail
: "${CAUSAL_CONV1D_VERSION:?}" "${MAMBA_VERSION:?}" "${OUT:?}"
# FORCE_BUILD: otherwise setup.py downloads a prebuilt wheel matched to whatever torch it guesses.
# mamba-ssm's setup.py hard-codes its -gencode list (sm80/sm90[/sm100]); TORCH_CUDA_ARCH_LIST does not apply there.
export CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAX_JOBS="${MAX_JOBS:-8}"
# --no-deps: mamba-ssm lists unpinned triton/transformers that would replace the image's pins.
pip wheel --no-build-isolation --no-deps --no-binary causal-conv1d --wheel-dir "$OUT" \
  "causal-conv1d==${CAUSAL_CONV1D_VERSION}"
pip wheel --no-build-isolation --no-deps --no-binary mamba-ssm --wheel-dir "$OUT" "mamba-ssm==${MAMBA_VERSION}"
ls -l "$OUT"
