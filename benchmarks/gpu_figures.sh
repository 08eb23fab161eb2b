#!/usr/bin/env bash
# Every GPU figure of the issues in one run (needs a CUDA device); JSON into DIR.
#
#   bash benchmarks/gpu_figures.sh [DIR]      (IS2RS=FILE: the IS2RS inputs, made if missing)
#
# 1. speed.py: SpinConv-All and ForceNet-All forward at batch 1 (38/66/146 atoms) and batched
#    (64 and 256 structures of 66 atoms), ASE step (plain, CUDA graph, graph + 1 Å skin, and
#    also compiled) and the replayed forward; float32, then with TF32 matmuls, then with the
#    models' blocks compiled; the replayed forward eager and compiled (replay_compile.py);
# 2. train_throughput.py: training frames/s, paper sizes, batch 8-64, float32 and bf16 autocast;
# 3. neighbors.py: batched neighbor lists on CUDA beside the CPU backends;
# 4. relax_speed.py: the 1,000 IS2RS inputs of OC20-EMT 'large' (made first, ~30 s) relaxed
#    batched, and 40 of them one by one with ASE, spinconv-fc, LBFGS;
# 5. auto_batch_memory.py: batch_size="auto" on a worst-case mix, then with 2% of the memory;
# 6. tf32_error.py: TF32 against the fixtures' float64 outputs (large fixtures from
#    ../shared/fixtures/ocp when present) and on the shipped models;
# 7. kernel_profile.py: operators, host synchronizations and top kernels per forward (batch 1, 64).
set -uo pipefail
source "$(dirname "$0")/gpu_lib.sh" "$@"
is2rs=${IS2RS:-scratch/is2rs_large.extxyz}  # input structures, kept out of DIR
mkdir -p "$(dirname "$is2rs")"
run python3 benchmarks/speed.py --devices cuda --batch 64 256 --repeats 10 --out "$dir/speed_cuda.json"
run python3 benchmarks/speed.py --devices cuda --batch 64 256 --repeats 10 --tf32 \
  --out "$dir/speed_cuda_tf32.json"
run python3 benchmarks/speed.py --devices cuda --sizes --batch 64 256 \
  --repeats 10 --compile --skip-ase-step --out "$dir/speed_cuda_compile.json"
run python3 benchmarks/replay_compile.py --modes default --out "$dir/replay_compile_cuda.json"
run python3 benchmarks/train_throughput.py --devices cuda --amp --out "$dir/train_throughput_cuda.json"
OMP_NUM_THREADS=1 run python3 benchmarks/neighbors.py --scale 3 --out "$dir/neighbors_cuda.json"
[ -f "$is2rs" ] || run python3 -m forcecalc data is2rs --size large --out "$is2rs" --quiet
run python3 benchmarks/relax_speed.py --data "$is2rs" --model spinconv-fc --optimizer lbfgs \
  --steps 300 --one-by-one-max 40 --device cuda --out "$dir/relax_speed_is2rs1000_cuda.json"
run python3 benchmarks/auto_batch_memory.py --device cuda --data "$is2rs" --n 1000 --steps 3 \
  --out "$dir/auto_batch_memory_cuda.json"
run python3 benchmarks/auto_batch_memory.py --device cuda --data "$is2rs" --n 300 --steps 2 \
  --squeeze 0.02 --out "$dir/auto_batch_memory_cuda_squeezed.json"
run python3 benchmarks/tf32_error.py --device cuda --shipped --out "$dir/tf32_error_cuda.json"
run python3 benchmarks/kernel_profile.py --devices cuda --batch 1 64 --out "$dir/kernel_profile_cuda.json"
exit $status
