#!/usr/bin/env bash
# Every GPU figure of the issues in one run (needs a CUDA device); JSON into DIR.
#
#   bash benchmarks/gpu_figures.sh [DIR] [N_RELAX]
#
# 1. speed.py: SpinConv-All and ForceNet-All forward at batch 1 (38/66/146 atoms) and batched
#    (32 and 256 structures of 66 atoms), ASE step; float32, then again with TF32 matmuls;
# 2. train_throughput.py: training frames/s, paper sizes, batch 8-64, float32 and bf16 autocast;
# 3. neighbors.py: batched neighbor lists on CUDA beside the CPU backends;
# 4. relax_speed.py: N_RELAX (default 100) relaxations batched vs one by one with ASE, spinconv-fc;
# 5. kernel_profile.py: operators, host synchronizations and top kernels per forward (batch 1, 64).
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${1:-benchmarks/results}
n_relax=${2:-100}
mkdir -p "$dir"
status=0
run() { echo "== $*"; "$@" || status=1; }
run python3 benchmarks/speed.py --devices cuda --batch 32 256 --repeats 20 --out "$dir/speed_cuda.json"
run python3 benchmarks/speed.py --devices cuda --batch 32 256 --repeats 20 --tf32 \
  --out "$dir/speed_cuda_tf32.json"
run python3 benchmarks/train_throughput.py --devices cuda --amp --out "$dir/train_throughput_cuda.json"
OMP_NUM_THREADS=1 run python3 benchmarks/neighbors.py --scale 3 --out "$dir/neighbors_cuda.json"
run python3 benchmarks/relax_speed.py --n "$n_relax" --device cuda --model spinconv-fc \
  --out "$dir/relax_speed_cuda.json"
run python3 benchmarks/kernel_profile.py --devices cuda --batch 1 64 --out "$dir/kernel_profile_cuda.json"
exit $status
