#!/usr/bin/env bash
# Two-GPU + Mamba-kernel measurements on a 2x H200 machine (nvidia-h200-x2), in stages; tables printed as they finish.
#
#   bash bench/device/run_x2.sh                                   # every stage, in the order below
#   STAGES="build train-step mamba-test b3-kernels" bash bench/device/run_x2.sh     # a subset (~10 min per subset)
#
# Stages:
#   adamw-kernel AdamW of one decoder layer: torch's fused kernel vs the Triton kernel (bench/adamw_kernel.py; GPU 1)
#   graphs-test  GPU tests: CUDA-graph layers vs kernel by kernel, overlapped optimizer, sync-free aux loss, Triton
#                AdamW vs torch's, Triton relu^2 (GPU 0)
#   build        causal-conv1d (sm_90) + mamba-ssm (Python/Triton) wheels, in the background (bench/device/build_mamba.sh);
#                skipped when .whl/ already holds both wheels (a previous build's wheels, copied back from $OUT)
#   b1           B1-bs4 on GPU 0 and B1-bs1 on GPU 1 at the same time (bench/device/run_all.sh; B1_BS4_VARIANTS,
#                B1_BS1_VARIANTS, REPEAT; B1_JOBS="bs1" for one job, B1_BS4_GPU / B1_BS1_GPU, B1_BUDGET seconds)
#   ce-test      GPU parity test of the compiled chunked linear + cross-entropy (GPU 1, in the background)
#   profile      one profiled step of `ours[PROFILE_VARIANT]` per job in PROFILE_JOBS (default B1-bs4; one GPU each,
#                concurrently; B2 on both GPUs afterwards, layouts B2_LAYOUTS): wall vs kernel vs host time, the top
#                kernels by GPU time; gzipped traces kept in $OUT (one per rank for B2)
#   ep-dispatch  DeepEP vs all-to-all equality and timing (bench/ep_dispatch.py, 2 GPUs)
#   kernels-test GPU tests: Triton K-way row sums and dots, row-bounded gathered-path kernels (GPU 0)
#   gathered-bench  the all-gather dispatcher's expert side on one GPU, per kernel set (bench/gathered_experts.py; GPU 0;
#                GATHERED_RANKS, default "2 4")
#   one-gpu-layouts  B1-bs4 `best` on one GPU: plain vs split experts in a one-rank all-gather group
#                (bench/one_gpu_layouts.py; GPU 0)
#   ep-graphs-test  GPU test: split experts with the all-gather dispatcher keep CUDA graphs, in a one-rank group
#                and on both GPUs (tests/gpu/test_allgather_graphs.py)
#   b2           B2: native FSDP2 / native EP=2 vs ours FSDP2-only and EP=2 + FSDP2 (bench/compare.py, 2 GPUs;
#                B2_VARIANTS, B2_NATIVE, B2_LAYOUTS, MOE_BENCH_DISPATCHER=alltoall|deepep|auto)
#   train-step   whole EP=2 training step, one process per dispatcher (bench/ep_train_step.py --saved --profile)
#   b3-torch     B3 without Mamba kernels (GPU 0)
#   plan         planner vs measured peaks (bench/plan_vs_measured.py, GPU 1, in the background)
#   mamba-test   GPU parity tests: Mamba kernel path vs fallback, overlapped optimizer (GPU 1 in the background when
#                b3-kernels runs too, else GPU 0)
#   b3-kernels   B3 with the kernels installed (native and ours use them; GPU B3_GPU or 0; B3_VARIANTS, B3_BUDGET)
# Wheels in .whl/ (deep_ep, liger, causal_conv1d, mamba_ssm) are installed into /tmp/site; sources for the build come
# from .device/src/{causal-conv1d,mamba-v2.3.0}.tar.gz. Results go to $OUT (or ./runs): JSON per stage, x2.log.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO="$(pwd)"
R="${OUT:-$REPO/runs}"
mkdir -p "$R"
LOG="$R/x2.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STAGES="${STAGES:-adamw-kernel graphs-test kernels-test build b1 ce-test profile ep-graphs-test b2 ep-dispatch train-step b3-torch plan mamba-test b3-kernels}"
SCRATCH=/tmp/x2
mkdir -p "$SCRATCH"
for wheel in .whl/*.whl; do
  [ -f "$wheel" ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site "$wheel" >/dev/null 2>&1 \
    && echo "installed $(basename "$wheel")"
done
export PYTHONPATH="/tmp/site:$REPO"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m | head -4
step() { echo; echo "=== $1 ($(date +%T))"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }
BUILD=""
PLANNER=""

if has build; then
  if compgen -G ".whl/causal_conv1d-*.whl" >/dev/null && compgen -G ".whl/mamba_ssm-*.whl" >/dev/null; then
    step "mamba kernels: wheels from .whl/ (no build)"
  else
    step "build mamba kernels (background)"
    MAX_JOBS="${MAX_JOBS:-12}" timeout 600 bash bench/device/build_mamba.sh .device/src/causal-conv1d.tar.gz \
      .device/src/mamba-v2.3.0.tar.gz "$SCRATCH/mwheels" > "$SCRATCH/build_mamba.log" 2>&1 &
    BUILD=$!
  fi
fi

ADAMW_BENCH=""
if has adamw-kernel; then
  step "AdamW kernel: torch fused vs Triton, one decoder layer (GPU 1, background)"
  CUDA_VISIBLE_DEVICES=1 timeout 120 python3 bench/adamw_kernel.py --sweep --out "$R/adamw_kernel.json" \
    > "$SCRATCH/adamw_kernel.log" 2>&1 &
  ADAMW_BENCH=$!
fi

if has graphs-test; then
  step "GPU parity tests: CUDA-graph layers, overlapped optimizer, aux loss, Triton AdamW, relu2 (GPU 0)"
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short \
    tests/gpu/test_cuda_graph_layers.py tests/gpu/test_optimizer_overlap.py tests/gpu/test_aux_loss_gpu.py \
    tests/gpu/test_adamw_triton.py tests/gpu/test_relu2_gpu.py > "$SCRATCH/graphs_test.log" 2>&1
  grep -E "^E .*(Error|assert)" "$SCRATCH/graphs_test.log" | head -12
  grep -E "^FAILED|^ERROR|passed|failed" "$SCRATCH/graphs_test.log" | tail -12
fi

if [ -n "$ADAMW_BENCH" ]; then
  wait "$ADAMW_BENCH"
  step "AdamW kernel (result)"
  tail -20 "$SCRATCH/adamw_kernel.log"
fi

if has b1; then
  # B1_JOBS picks the jobs (default both); B1_BS4_GPU / B1_BS1_GPU their GPUs (default 0 / 1: concurrently)
  step "B1: ${B1_JOBS:-bs4 bs1} (bs4 on GPU ${B1_BS4_GPU:-0}, bs1 on GPU ${B1_BS1_GPU:-1})"
  PIDS=()
  for job in ${B1_JOBS:-bs4 bs1}; do
    if [ "$job" = bs4 ]; then gpu="${B1_BS4_GPU:-0}"; variants="${B1_BS4_VARIANTS:-best}"
    else gpu="${B1_BS1_GPU:-1}"; variants="${B1_BS1_VARIANTS:-loss=chunked+fused-experts+opt-overlap+compile}"; fi
    (CUDA_VISIBLE_DEVICES=$gpu OUT="$SCRATCH/b1-$job" SELFTEST=0 RECIPE=none PLAN="B1-$job|$variants|${B1_BUDGET:-300}" \
      bash bench/device/run_all.sh > "$SCRATCH/b1-$job.log" 2>&1) &
    PIDS+=($!)
  done
  wait "${PIDS[@]}"
  for job in ${B1_JOBS:-bs4 bs1}; do
    grep -E "^\| B1" "$SCRATCH/b1-$job.log" | sort -u
    cp "$SCRATCH/b1-$job/bench/B1-$job/results.json" "$R/B1-$job.json" 2>/dev/null
  done
fi

CE_TEST=""
if has ce-test; then
  step "GPU parity test: compiled chunked linear + cross-entropy (GPU 1, background)"
  (CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/gpu/test_linear_cross_entropy_gpu.py > "$SCRATCH/ce_test.log" 2>&1) &
  CE_TEST=$!
fi

if has profile; then
  # one profiled step of ours[PROFILE_VARIANT] per job in PROFILE_JOBS (one-GPU jobs, one per GPU, concurrently)
  step "profile: ${PROFILE_JOBS:-B1-bs4} ours[${PROFILE_VARIANT:-best}]"
  # B2 takes both GPUs (layouts from B2_LAYOUTS, default replicate-sharded), after the one-GPU jobs
  gpu=0; PIDS=()
  for job in ${PROFILE_JOBS:-B1-bs4}; do
    [ "$job" = B2 ] && continue
    (CUDA_VISIBLE_DEVICES=$gpu MOE_BENCH_TRACE_DIR="$R" timeout 240 python3 -m bench.compare --jobs "$job" \
      --variants "${PROFILE_VARIANT:-best}" \
      --recipe none --ours-only --profile --steps 3 --out "$SCRATCH/profile-$job" > "$SCRATCH/profile-$job.log" 2>&1) &
    PIDS+=($!); gpu=$((gpu + 1))
  done
  [ ${#PIDS[@]} -gt 0 ] && wait "${PIDS[@]}"
  if [[ " ${PROFILE_JOBS:-B1-bs4} " == *" B2 "* ]]; then
    MOE_BENCH_TRACE_DIR="$R" timeout 300 python3 -m bench.compare --jobs B2 --variants "${PROFILE_VARIANT:-best}" \
      --ours-layouts "${B2_LAYOUTS:-replicate-sharded}" --recipe none --ours-only --profile --steps 3 \
      --out "$SCRATCH/profile-B2" > "$SCRATCH/profile-B2.log" 2>&1
  fi
  for job in ${PROFILE_JOBS:-B1-bs4}; do
    echo "--- $job"; grep -v "^\s*$" "$SCRATCH/profile-$job.log" | tail -56
    cp "$SCRATCH/profile-$job/results.json" "$R/$job-profile.json" 2>/dev/null
  done
fi

if has ep-dispatch; then
  step "EP dispatch: DeepEP vs all-to-all"
  timeout 180 torchrun --standalone --nproc-per-node 2 bench/ep_dispatch.py --out "$R/ep_dispatch.json" 2>&1 \
    | grep -v "^\s*$" | tail -25
fi

if has kernels-test; then
  step "GPU tests: Triton row sums and dots, row-bounded kernels (GPU 0)"
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short \
    tests/gpu/test_row_sum_gpu.py tests/gpu/test_bounded_rows_gpu.py > "$SCRATCH/kernels_test.log" 2>&1
  grep -E "^E .*(Error|assert)" "$SCRATCH/kernels_test.log" | head -12
  grep -E "^FAILED|^ERROR|passed|failed" "$SCRATCH/kernels_test.log" | tail -8
fi

if has gathered-bench; then
  step "gathered experts on one GPU: ranks ${GATHERED_RANKS:-2 4} (GPU 0)"
  CUDA_VISIBLE_DEVICES=0 timeout 300 python3 bench/gathered_experts.py --ranks ${GATHERED_RANKS:-2 4} \
    --out "$R/gathered_experts.json" 2>&1 | tail -12
fi

if has one-gpu-layouts; then
  step "one GPU, B1-bs4 best: plain vs split experts through the all-gather dispatcher (GPU 0)"
  CUDA_VISIBLE_DEVICES=0 timeout 300 python3 bench/one_gpu_layouts.py --job B1-bs4 --variant best \
    --modes plain,allgather --out "$R/one_gpu_layouts.json" 2>&1 | tail -8
fi

if has ep-graphs-test; then
  step "GPU parity test: split experts with the all-gather dispatcher keep CUDA graphs (1 rank, then 2 GPUs)"
  timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu --tb=short tests/gpu/test_allgather_graphs.py \
    > "$SCRATCH/ep_graphs_test.log" 2>&1
  grep -E "^E .*(Error|assert)" "$SCRATCH/ep_graphs_test.log" | head -12
  grep -E "^FAILED|^ERROR|passed|failed" "$SCRATCH/ep_graphs_test.log" | tail -6
fi

if has b2; then
  step "B2: native vs ours, 2 GPUs (dispatcher ${MOE_BENCH_DISPATCHER:-auto})"
  timeout "${B2_BUDGET:-420}" python3 -m bench.compare --jobs B2 \
    --variants "${B2_VARIANTS:-best}" --recipe none --ours-layouts "${B2_LAYOUTS:-fsdp,ep}" \
    --native-layouts "${B2_NATIVE:-fsdp,ep}" --steps 4 --warmup 2 --repeat "${REPEAT:-1}" --timeout 300 \
    --out "$SCRATCH/B2" 2>&1 | grep -v "^\s*$" | tail -20
  cp "$SCRATCH/B2/results.json" "$R/B2.json" 2>/dev/null
fi

if has train-step; then
  step "EP=2 training step, one process per dispatcher"
  for dispatcher in ${TRAIN_STEP_DISPATCHERS:-alltoall deepep}; do
    # shellcheck disable=SC2086
    timeout 200 torchrun --standalone --nproc-per-node 2 bench/ep_train_step.py ${TRAIN_STEP_ARGS:---steps 3 --warmup 2} --ac none \
      --dispatchers "$dispatcher" --saved --profile --out "$R/ep_train_step_$dispatcher.json" 2>&1 \
      > "$SCRATCH/train_step_$dispatcher.log" 2>&1
    grep -v "^\s*$" "$SCRATCH/train_step_$dispatcher.log" | grep -E -v "^\s+(File|\^)" | tail -45
  done
fi

if has plan; then
  step "planner vs measured (GPU 1, background)"
  (CUDA_VISIBLE_DEVICES=1 timeout 330 python3 bench/plan_vs_measured.py --out "$R/plan_vs_measured.json" \
    > "$SCRATCH/plan.log" 2>&1; echo "planner exit $?" >> "$SCRATCH/plan.log") &
  PLANNER=$!
fi

if has b3-torch; then
  step "B3 without Mamba kernels (GPU 0)"
  CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m bench.compare --jobs B3 --variants "${B3_VARIANTS:-best}" \
    --recipe none --steps 4 --warmup 2 --out "$SCRATCH/B3-torch" 2>&1 | grep -v "^\s*$" | tail -12
  cp "$SCRATCH/B3-torch/results.json" "$R/B3-torch.json" 2>/dev/null
fi

if [ -n "$BUILD" ]; then
  step "wait for the kernel build"
  wait "$BUILD"; echo "build exit $?"; tail -5 "$SCRATCH/build_mamba.log"
  python3 -m pip install -q --no-index --no-deps --target /tmp/site "$SCRATCH"/mwheels/*.whl \
    && echo "installed $(ls "$SCRATCH/mwheels")"
  # The wheel comes back in <16 MiB parts (cat causal_conv1d.whl.part-* > WHEEL): later calls install it, no rebuild
  if [ "${RETURN_WHEEL:-1}" = "1" ]; then
    for wheel in "$SCRATCH"/mwheels/causal_conv1d-*.whl; do
      (cd "$R" && split -b 15M "$wheel" "$(basename "$wheel").part-")
    done
  fi
fi

if has mamba-test || has b3-kernels; then
  python3 -c "from trainer.kernels import mamba; print(mamba.status())"
fi

MAMBA_TEST=""
if has mamba-test; then
  step "GPU parity tests: Mamba kernel path vs fallback, overlapped optimizer"
  gpu=0; has b3-kernels && gpu=1
  (CUDA_VISIBLE_DEVICES=$gpu timeout 280 python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/gpu/test_mamba_kernels.py tests/gpu/test_optimizer_overlap.py > "$SCRATCH/gpu_tests.log" 2>&1) &
  MAMBA_TEST=$!
  has b3-kernels || wait "$MAMBA_TEST"
fi

if has b3-kernels; then
  step "B3 with Mamba kernels (GPU ${B3_GPU:-0})"
  CUDA_VISIBLE_DEVICES="${B3_GPU:-0}" timeout "${B3_BUDGET:-300}" python3 -m bench.compare --jobs B3 --variants "${B3_VARIANTS:-best}" \
    --recipe none --steps 4 --warmup 2 --repeat "${REPEAT:-1}" --out "$SCRATCH/B3-kernels" 2>&1 \
    | grep -v "^\s*$" | tail -14
  cp "$SCRATCH/B3-kernels/results.json" "$R/B3-kernels.json" 2>/dev/null
fi

if [ -n "$CE_TEST" ]; then
  wait "$CE_TEST"
  step "GPU parity test: compiled chunked cross-entropy (result)"
  tail -8 "$SCRATCH/ce_test.log"
fi

if [ -n "$MAMBA_TEST" ]; then
  wait "$MAMBA_TEST"
  step "GPU parity tests (result)"
  tail -15 "$SCRATCH/gpu_tests.log"
fi

if [ -n "$PLANNER" ]; then
  step "planner vs measured"
  wait "$PLANNER"; tail -25 "$SCRATCH/plan.log"
fi
echo; echo "=== files"; find "$R" -type f | sort
