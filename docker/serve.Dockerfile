# syntax=docker/dockerfile:1.7
# The serving image: a pinned vLLM release that serves the exported checkpoint (Qwen3-MoE, Nemotron-H MoE, ...).
#   docker build -f docker/serve.Dockerfile -t moe-stack/serve:0.1.0 .        (or: make images)
# Separate from the trainer image on purpose: vLLM of the torch-2.7.1 era (0.10.x) cannot serve Nemotron-H MoE
# (its MoE layer type arrives in 0.11.1, which pins torch 2.9), and 0.11-0.18 cap transformers < 5.
# v0.19.1 is the first release that ships transformers v5 (so it reads the export's v5 config fields, e.g.
# rope_parameters and layers_block_type, with the same parser the trainer wrote them with), and it serves
# Qwen3MoeForCausalLM and NemotronHForCausalLM (MoE) natively, without --trust-remote-code.
# The exported safetensors directory is the whole contract between the two images.

ARG VLLM_VERSION=v0.19.1
ARG VLLM_IMAGE=vllm/vllm-openai:${VLLM_VERSION}
ARG IMAGE_VERSION=0.1.0

FROM ${VLLM_IMAGE} AS serve
ARG VLLM_VERSION
ARG IMAGE_VERSION
LABEL org.opencontainers.image.title="moe-stack serve" \
      org.opencontainers.image.description="vLLM ${VLLM_VERSION} serving a moe-stack export (OpenAI-compatible API)" \
      org.opencontainers.image.version="${IMAGE_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.moe-stack.vllm="${VLLM_VERSION}"
ENV MODEL_DIR=/export \
    SERVED_MODEL_NAME=moe-export \
    PORT=8000 \
    VLLM_EXTRA_ARGS="" \
    HF_HUB_OFFLINE=1 \
    HOME=/home/vllm
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY docker/serve-entrypoint.sh /usr/local/bin/serve-entrypoint
RUN useradd --create-home --uid 1000 --shell /bin/bash vllm
USER 1000:1000
EXPOSE 8000
# Health from inside the container without curl (not every vLLM image ships it).
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('PORT', '8000')}/health\", timeout=4)"]
ENTRYPOINT ["/usr/local/bin/serve-entrypoint"]
