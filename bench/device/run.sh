#!/usr/bin/env bash
# The whole measurement in one call on a GPU machine (one H200): GPU tests, then `moe train` against transformers
# native job by job, each native row first; the summary table is printed last.
#
#   bash bench/device/run.sh                           # the reference table of docs/BENCHMARKS.md
#   STAGES="bench" PLAN="B1-bs4|default;overlap" bash bench/device/run.sh
#   STEPS=20 WARMUP=5 PROFILE=1 bash bench/device/run.sh    # PROFILE=1: top kernels of each ours run's last step
#   TESTS=tests/gpu/test_stable_block_masks_gpu.py STAGES="tests bench" bash bench/device/run.sh   # some GPU tests
#
# Stages: tests (tests/gpu, background on the same GPU before the benchmark starts: no), mamba (causal-conv1d for
# sm_90 + mamba-ssm's Triton kernels from .device/src/*.tar.gz, or their wheels from .whl/), bench.
# Wheels in .whl/ (liger_kernel, causal_conv1d, mamba_ssm) are installed into /tmp/site without network.
# Results: $OUT (or ./runs/device): results.tgz (bench/<job>/results.json, each run's recipe, metrics.jsonl, log and
# profile, the GPU test log) and, after a build, the kernel wheels in < 16 MiB parts.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO="$(pwd)"
DEST="${OUT:-$REPO/runs/device}"
R="$(mktemp -d)/device-run"
mkdir -p "$R" "$DEST"
STAGES="${STAGES:-tests mamba bench}"
# One job per line: JOB|VARIANTS[|SET], SET being recipe overrides for both sides of that job (default: $SET).
# The overlapped optimizer cannot clip, so its row is compared with a native run that does not clip either. LoRA
# `graphs`: adapters skip the held-back updates and the in-backward norm anyway, so graphs cost them nothing there.
PLAN="${PLAN:-B1-bs4|default
B1-bs4|overlap|optim.max_grad_norm=0
B1-bs1|default
B3|default
B4-lora|default;graphs
B4-lora|overlap|optim.max_grad_norm=0}"
export PYTHONPATH="$REPO:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
has() { [[ " $STAGES " == *" $1 "* ]]; }
# results.tgz is rewritten after every stage, so a call cut short by its time limit still brings back what finished.
# Chrome traces and weights stay out of it (a 48-layer trace, or the 57 GB random-init base a LoRA run saves, is over
# what a call brings back); profile.txt has the top kernels.
pack() { tar czf "$DEST/results.tgz" -C "$R" --exclude='*/model/*' --exclude='*/data/*' --exclude='*.trace.json*' \
  --exclude='*.safetensors' . 2>/dev/null; }
step() { echo; echo "=== $* ($(date +%T))"; }

for wheel in .whl/*.whl; do
  [ -e "$wheel" ] || continue
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$wheel" >/dev/null 2>&1 \
    && echo "installed $(basename "$wheel")" || echo "skipped $(basename "$wheel")"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
git log --oneline -1 2>/dev/null || true

# Dirty/writeback page cache every 2 s (a LoRA run writes its 57 GiB base before training: does its writeback
# overlap the measured steps?); stops with this script.
while sleep 2; do echo "$(date +%T) $(grep -E '^(Dirty|Writeback):' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"; done \
  > "$R/meminfo.log" 2>/dev/null &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null' EXIT

BUILD=""
if has mamba && ! python3 -c "import causal_conv1d" 2>/dev/null; then
  step "build causal-conv1d (sm_90) + mamba-ssm wheels (background, 8 jobs)"
  MAX_JOBS=8 timeout 540 bash bench/device/build_mamba.sh .device/src/causal-conv1d.tar.gz \
    .device/src/mamba-v2.3.0.tar.gz /tmp/mwheels > "$R/build_mamba.log" 2>&1 &
  BUILD=$!
fi

if has tests; then
  step "GPU tests"
  timeout 420 python3 -m pytest -q -x -p no:cacheprovider -m gpu ${TESTS:-tests/gpu} > "$R/gpu-tests.log" 2>&1
  echo "exit $?"; tail -15 "$R/gpu-tests.log"
  pack
fi

PROFILE_ARGS=()
[ "${PROFILE:-0}" = "1" ] && PROFILE_ARGS=(--profile)
while IFS='|' read -r job variants jobset; do
  jobset="${jobset:-${SET:-}}"
  [ -z "$job" ] && continue
  has bench || break
  if [[ "$job" == B3* ]] && [ -n "$BUILD" ]; then
    step "wait for the kernel build"
    wait "$BUILD"; echo "build exit $?"; tail -3 "$R/build_mamba.log"
    python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/mwheels/*.whl && ls /tmp/mwheels
    for wheel in /tmp/mwheels/*.whl; do  # back in < 16 MiB parts: cat NAME.part-* > NAME, then carry it in .whl/
      (cd "$DEST" && split -b 15M "$wheel" "$(basename "$wheel").part-")
    done
    BUILD=""
  fi
  [[ "$job" == B3* ]] && python3 -c "from trainer.kernels import mamba; print(mamba.status())"
  out="$R/bench/$job"; n=2
  while [ -e "$out" ]; do out="$R/bench/$job-$n"; n=$((n + 1)); done  # a job on two lines: both kept
  step "$job: native, then moe train [$variants] ${jobset:+(--set $jobset)}"
  timeout "${JOB_BUDGET:-560}" python3 -m bench.compare --jobs "$job" --variants "$variants" --steps "${STEPS:-20}" \
    --set "$jobset" \
    --warmup "${WARMUP:-5}" --out "$out" "${PROFILE_ARGS[@]}" 2>&1 | grep -v "^\s*$" | grep -v "^job \|^---\|^wrote" | tail -8
  pack
done <<< "$PLAN"

if [ -n "$BUILD" ]; then  # built but not used by this plan: still bring the wheels back
  wait "$BUILD"; echo "build exit $?"
  for wheel in /tmp/mwheels/*.whl; do (cd "$DEST" && split -b 15M "$wheel" "$(basename "$wheel").part-"); done
fi
pack
if has bench; then
  step "summary"
  python3 -m bench.report "$R"/bench/*/results.json --text
fi
