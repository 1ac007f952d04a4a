# syntax=docker/dockerfile:1.7
# The trainer image: PyTorch 2.7.1 (CUDA 12.8) + transformers v5 + the MoE kernels, built for Hopper (sm90).
#   docker build -t moe-stack/trainer:0.1.0 .          (or: make images)
# Stages: base (CUDA devel + Python venv + torch + pinned deps) -> one wheel builder per source-built extension
# (TransformerEngine, DeepEP, mamba-ssm/causal-conv1d, flash-attn) -> runtime (CUDA runtime + the venv + wheels).
# Every version is an ARG here; the Python dependencies are pinned in docker/requirements-train.txt.

ARG CUDA_VERSION=12.8.1
ARG UBUNTU_VERSION=24.04
ARG BASE_IMAGE=nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu${UBUNTU_VERSION}
ARG RUNTIME_IMAGE=nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu${UBUNTU_VERSION}
# torch 2.7.1 on PyPI is the CUDA 12.6 build; the cu128 build comes from PyTorch's own index.
ARG TORCH_VERSION=2.7.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TE_VERSION=2.8
ARG DEEPEP_REF=v1.2.1
ARG MAMBA_VERSION=2.2.5
ARG CAUSAL_CONV1D_VERSION=1.5.2
ARG FLASH_ATTN_VERSION=2.8.1
ARG BUILD_FLASH_ATTN=0
# sm90 (H100/H200); add sm100 (B200) with --build-arg TORCH_CUDA_ARCH_LIST="9.0;10.0" NVTE_CUDA_ARCHS="90;100".
ARG TORCH_CUDA_ARCH_LIST=9.0
ARG NVTE_CUDA_ARCHS=90
ARG MAX_JOBS=16
ARG IMAGE_VERSION=0.1.0
ARG MOE_EXPECT_BACKENDS=deepep,te,mamba

# ---------------------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
ARG TORCH_VERSION
ARG TORCH_INDEX_URL
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Distribution packages float with the pinned base image's apt snapshot; pinning them too would break the build
# at the next Ubuntu security update without making the image more reproducible than the base digest does.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY docker/requirements-train.txt /tmp/requirements-train.txt
# The constraint keeps every later install from moving torch off the cu128 build.
RUN echo "torch==${TORCH_VERSION}" > /tmp/torch-constraint.txt \
 && pip install -r /tmp/requirements-train.txt -c /tmp/torch-constraint.txt

# ---------------------------------------------------------------------------------------------------------------
FROM base AS build-transformer-engine
ARG TE_VERSION
ARG NVTE_CUDA_ARCHS
ARG MAX_JOBS
COPY docker/wheels/build-transformer-engine.sh /usr/local/bin/
RUN TE_VERSION=${TE_VERSION} NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS} MAX_JOBS=${MAX_JOBS} OUT=/wheels \
    build-transformer-engine.sh

FROM base AS build-deepep
ARG DEEPEP_REF
ARG TORCH_CUDA_ARCH_LIST
COPY docker/wheels/build-deepep.sh /usr/local/bin/
RUN DEEPEP_REF=${DEEPEP_REF} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} OUT=/wheels build-deepep.sh

FROM base AS build-mamba
ARG MAMBA_VERSION
ARG CAUSAL_CONV1D_VERSION
ARG MAX_JOBS
COPY docker/wheels/build-mamba.sh /usr/local/bin/
RUN MAMBA_VERSION=${MAMBA_VERSION} CAUSAL_CONV1D_VERSION=${CAUSAL_CONV1D_VERSION} MAX_JOBS=${MAX_JOBS} OUT=/wheels \
    build-mamba.sh

FROM base AS build-flash-attn
ARG FLASH_ATTN_VERSION
ARG BUILD_FLASH_ATTN
ARG NVTE_CUDA_ARCHS
ARG MAX_JOBS
COPY docker/wheels/build-flash-attn.sh /usr/local/bin/
RUN FLASH_ATTN_VERSION=${FLASH_ATTN_VERSION} BUILD_FLASH_ATTN=${BUILD_FLASH_ATTN} \
    FLASH_ATTN_CUDA_ARCHS=${NVTE_CUDA_ARCHS} MAX_JOBS=${MAX_JOBS} OUT=/wheels build-flash-attn.sh

# ---------------------------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
ARG TORCH_VERSION
ARG TE_VERSION
ARG DEEPEP_REF
ARG MAMBA_VERSION
ARG CAUSAL_CONV1D_VERSION
ARG IMAGE_VERSION
ARG MOE_EXPECT_BACKENDS
LABEL org.opencontainers.image.title="moe-stack trainer" \
      org.opencontainers.image.description="MoE fine-tuning on transformers v5: PyTorch ${TORCH_VERSION} cu128, TransformerEngine ${TE_VERSION}, DeepEP ${DEEPEP_REF}, mamba-ssm ${MAMBA_VERSION}, causal-conv1d ${CAUSAL_CONV1D_VERSION}" \
      org.opencontainers.image.version="${IMAGE_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.moe-stack.torch="${TORCH_VERSION}" \
      io.moe-stack.transformer-engine="${TE_VERSION}" \
      io.moe-stack.deepep="${DEEPEP_REF}" \
      io.moe-stack.expect-backends="${MOE_EXPECT_BACKENDS}"
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    MOE_EXPECT_BACKENDS=${MOE_EXPECT_BACKENDS} \
    HF_HOME=/home/moe/.cache/huggingface \
    PYTHONUNBUFFERED=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Triton (mamba's SSD scan, Liger) compiles small launchers at run time: it needs gcc and Python.h.
# Unpinned apt packages for the same reason as in the base stage (they follow the pinned base image).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
# The venv (torch + pinned deps) lives at the same path as in the builders, so extension rpaths still resolve.
COPY --from=base /opt/venv /opt/venv
RUN --mount=type=bind,from=build-transformer-engine,source=/wheels,target=/wheels/te \
    --mount=type=bind,from=build-deepep,source=/wheels,target=/wheels/deepep \
    --mount=type=bind,from=build-mamba,source=/wheels,target=/wheels/mamba \
    --mount=type=bind,from=build-flash-attn,source=/wheels,target=/wheels/flash-attn \
    find /wheels -name '*.whl' -print0 | xargs -0 pip install --no-deps

# The project itself (dependencies already pinned above, so --no-deps).
WORKDIR /opt/moe-stack
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY eval ./eval
COPY docker/entrypoint.sh /usr/local/bin/moe-entrypoint
RUN pip install --no-deps . \
 && useradd --create-home --uid 1000 --shell /bin/bash moe \
 && mkdir -p /runs /home/moe/.cache/huggingface \
 && chown -R moe:moe /runs /home/moe

USER 1000:1000
WORKDIR /runs
# Named volumes start as a copy of this folder, so they are owned by the non-root user.
VOLUME ["/runs"]
ENTRYPOINT ["/usr/local/bin/moe-entrypoint"]
CMD ["moe", "--help"]
