#!/usr/bin/env bash
# Serving image entrypoint: check the mounted export, then hand over to `vllm serve`.
# Env: MODEL_DIR (the export, mounted read-only), SERVED_MODEL_NAME, PORT, VLLM_EXTRA_ARGS (e.g.
# "--tensor-parallel-size 8 --gpu-memory-utilization 0.6"); extra arguments to the container are appended.
set -euo pipefail
if [ ! -f "${MODEL_DIR}/config.json" ]; then
  echo "error: ${MODEL_DIR} holds no exported checkpoint (no config.json); run the export step first (make export)" >&2
  exit 2
fi
# shellcheck disable=SC2086  # VLLM_EXTRA_ARGS is a list of flags, split on purpose
exec vllm serve "${MODEL_DIR}" --served-model-name "${SERVED_MODEL_NAME}" --host 0.0.0.0 --port "${PORT}" \
  ${VLLM_EXTRA_ARGS} "$@"
