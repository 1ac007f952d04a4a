#!/usr/bin/env bash
# Two-GPU + Mamba-kernel measurements in one call on a 2x H200 machine (nvidia-h200-x2); tables printed last.
#
#   bash bench/device/run_x2.sh        # needs .device/src/{causal-conv1d,mamba-v2.3.0}.tar.gz and .whl/ (deep_ep, liger)
#
# 1. builds causal-conv1d (sm_90) + mamba-ssm (Python/Triton) wheels in the background (bench/device/build_mamba.sh)
# 2. EP dispatch: DeepEP vs all-to-all equality and timing (bench/ep_dispatch.py, 2 GPUs)
# 3. B2: native FSDP2 / native EP=2 vs ours EP=2 + FSDP2 (bench/compare.py, 2 GPUs)
# 4. whole EP=2 training step with each dispatcher (bench/ep_train_step.py, 2 GPUs)
# 5. B3 without Mamba kernels (GPU 0) while the planner check runs on GPU 1 (bench/plan_vs_measured.py)
# 6. with the kernels installed: GPU parity test of the kernel path, then B3 again (native and ours use the kernels)
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO="$(pwd)"
R="${OUT:-$REPO/runs}"
mkdir -p "$R"
LOG="$R/x2.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for wheel in .whl/deep_ep*.whl .whl/liger*.whl; do
  [ -f "$wheel" ] && python3 -m pip install -q --no-index --no-deps --target /tmp/site "$wheel" >/dev/null 2>&1 && echo "installed $(basename "$wheel")"
done
export PYTHONPATH="/tmp/site:$REPO"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m | head -4
step() { echo; echo "=== $1 ($(date +%T))"; }

step "build mamba kernels (background)"
MAX_JOBS=8 timeout 600 bash bench/device/build_mamba.sh .device/src/causal-conv1d.tar.gz .device/src/mamba-v2.3.0.tar.gz /tmp/mwheels > /tmp/build_mamba.log 2>&1 &
BUILD=$!

step "EP dispatch: DeepEP vs all-to-all"
timeout 180 torchrun --standalone --nproc-per-node 2 bench/ep_dispatch.py --out "$R/ep_dispatch.json" 2>&1 | grep -v "^\s*$" | tail -25

step "B2: native vs ours, 2 GPUs"
timeout 420 python3 -m bench.compare --jobs B2 --variants fused-ce+fused-experts+liger+fused-adamw --recipe none \
  --native-layouts fsdp,ep --steps 4 --warmup 2 --timeout 300 --out "$R/B2" 2>&1 | grep -v "^\s*$" | tail -20

step "EP=2 training step per dispatcher"
timeout 240 torchrun --standalone --nproc-per-node 2 bench/ep_train_step.py --steps 3 --warmup 2 --ac none \
  --out "$R/ep_train_step.json" 2>&1 | grep -v "^\s*$" | tail -15

step "B3 without Mamba kernels (GPU 0) | planner vs measured (GPU 1)"
(CUDA_VISIBLE_DEVICES=1 timeout 330 python3 bench/plan_vs_measured.py --out "$R/plan_vs_measured.json" > /tmp/plan.log 2>&1; echo "planner exit $?" >> /tmp/plan.log) &
PLAN=$!
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m bench.compare --jobs B3 --variants best --recipe none --steps 4 --warmup 2 \
  --out "$R/B3-torch" 2>&1 | grep -v "^\s*$" | tail -12

step "wait for the kernel build"
wait $BUILD; echo "build exit $?"; tail -5 /tmp/build_mamba.log
python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/mwheels/*.whl && echo "installed $(ls /tmp/mwheels)"
python3 -c "from trainer.kernels import mamba; print(mamba.status())"

step "Mamba kernel path vs fallback (bf16, GPU 0)"
CUDA_VISIBLE_DEVICES=0 timeout 180 python3 -m pytest -q -x tests/gpu/test_mamba_kernels.py 2>&1 | tail -8

step "B3 with Mamba kernels (GPU 0)"
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 -m bench.compare --jobs B3 --variants best --recipe none --steps 4 --warmup 2 \
  --out "$R/B3-kernels" 2>&1 | grep -v "^\s*$" | tail -12

step "planner vs measured"
wait $PLAN; tail -25 /tmp/plan.log
rm -f "$R"/*/results.md "$R"/B3-*/results.png
echo; echo "=== files"; find "$R" -type f | sort
