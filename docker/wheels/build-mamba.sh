#!/usr/bin/env bash
# Build causal-conv1d and mamba-ssm from their sdists against the installed torch (Nemotron-H's fast path).
# Env: CAUSAL_CONV1D_VERSION, MAMBA_VERSION, TORCH_CUDA_ARCH_LIST (e.g. "9.0;10.0"), MAX_JOBS, OUT (wheel folder).
set -euo pipefail
: "${CAUSAL_CONV1D_VERSION:?}" "${MAMBA_VERSION:?}" "${TORCH_CUDA_ARCH_LIST:?}" "${OUT:?}"
# FORCE_BUILD: otherwise setup.py downloads a prebuilt wheel matched to whatever torch it guesses.
export CAUSAL_CONV1D_FORCE_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE MAX_JOBS="${MAX_JOBS:-8}" TORCH_CUDA_ARCH_LIST
here="$(cd "$(dirname "$0")" && pwd)"
src="$(mktemp -d)"
for spec in "causal-conv1d==${CAUSAL_CONV1D_VERSION}" "mamba-ssm==${MAMBA_VERSION}"; do
  # Both setup.py files hard-code their -gencode list (8+ architectures) and ignore TORCH_CUDA_ARCH_LIST:
  # unpack the sdist and limit the list to the requested architectures before building.
  pip download --no-deps --no-binary :all: --no-build-isolation --dest "$src" "$spec"
done
for archive in "$src"/*.tar.gz; do
  tar -xzf "$archive" -C "$src"
  tree="${archive%.tar.gz}"
  python "$here/limit-gencode.py" "$tree/setup.py"
  # --no-deps: mamba-ssm lists unpinned triton/transformers that would replace the image's pins.
  (cd "$tree" && pip wheel --no-build-isolation --no-deps --wheel-dir "$OUT" .)
done
rm -rf "$src"
ls -l "$OUT"
