#!/usr/bin/env bash
# The whole benchmark in one call on a GPU machine (one H200 for B1/B3, two for B2); prints the summary table last.
#
#   bash bench/device/run_all.sh                 # default plan below, results under $OUT/bench (or ./runs/bench)
#   PLAN="B1-bs1|base,best|200" bash bench/device/run_all.sh      # one line per job: job|variants|seconds budget
#   STEPS=4 WARMUP=2 REPEAT=1 RECIPE=best PROFILE=1 SELFTEST=0 bash bench/device/run_all.sh
#   PLAN="B2|fused-ce+fused-experts+liger+fused-adamw|420" bash bench/device/run_all.sh     # 2 GPUs: EP=2 + FSDP2;
#       native runs HF's DistributedConfig(fsdp_size=2) (NATIVE_LAYOUTS=fsdp,ep adds tp_size=2 + expert parallel)
#
# Wheels in .whl/ (e.g. liger_kernel) are installed into /tmp/site first, without dependencies and without network.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO="$(pwd)"
OUT_DIR="${OUT:-$REPO/runs}/bench"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" > /dev/null; then
  for wheel in .whl/*.whl; do  # one at a time: a wheel for another platform must not block the others
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "$wheel" > /tmp/pip-wheel.log 2>&1 \
      && echo "installed $(basename "$wheel")" || echo "skipped $(basename "$wheel"): $(tail -1 /tmp/pip-wheel.log)"
  done
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$REPO:${PYTHONPATH:-}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
"$PY" - <<'PY'
import importlib
for name in ("torch", "transformers", "triton", "liger_kernel", "torchao"):
    try:
        print(f"{name} {getattr(importlib.import_module(name), '__version__', 'installed')}")
    except Exception as err:
        print(f"{name} not importable ({type(err).__name__})")
PY

if [ "${SELFTEST:-1}" = "1" ]; then
  timeout 90 "$PY" -m bench.selftest 2>&1 | grep -E "^(PASS|FAIL|SKIP|selftest|torch|   )" | tee "$OUT_DIR/selftest.txt"
fi

# job | ours variants (comma-separated, each '+'-joined options) | seconds for the whole job
# (loss=chunked+fused-experts+opt-overlap+compile is "best" without any Liger kernel: fastest at bs1, where the
#  chunked torch CE beats Liger's; it also survives a Liger/Triton mismatch)
DEFAULT_PLAN="B1-bs1|loss=chunked+fused-experts+opt-overlap+compile,best|240
B1-bs4|best,best+ac=attn|200"
PLAN="${PLAN:-$DEFAULT_PLAN}"
EXTRA=()
[ "${PROFILE:-0}" = "1" ] && EXTRA+=(--profile)

while IFS='|' read -r job variants budget; do
  [ -z "$job" ] && continue
  echo "=== $job: native + ours[$variants] + recipe[${RECIPE:-best}] (budget ${budget}s)"
  timeout -k 15 --signal=TERM "$budget" "$PY" -m bench.compare --jobs "$job" --variants "$variants" \
    --recipe "${RECIPE:-best}" --steps "${STEPS:-4}" --warmup "${WARMUP:-2}" --repeat "${REPEAT:-1}" \
    --timeout "${RUN_TIMEOUT:-200}" --native-layouts "${NATIVE_LAYOUTS:-fsdp}" --out "$OUT_DIR/$job" "${EXTRA[@]}" 2>&1 | grep -v "^\s*$" | tail -60
  echo "=== $job done (exit ${PIPESTATUS[0]})"
done <<< "$PLAN"

echo
echo "=== summary (from $OUT_DIR/*/results.json)"
"$PY" -m bench.report "$OUT_DIR"/*/results.json --png "$OUT_DIR/summary.png" --text
