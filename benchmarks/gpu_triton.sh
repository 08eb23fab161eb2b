#!/usr/bin/env bash
# The fused Triton kernels on one GPU (a few minutes; part 0 of gpu_quick.sh): JSON and logs
# into DIR.  The headline figure comes first, so that a run cut short still has it.
#
#   bash benchmarks/gpu_triton.sh [DIR]
#
# 1. SpinConv-All batched (64 and 256 x 66 atoms): the PyTorch path, then the fused kernels
#    with tf32x3 products (speed.py, with their largest force difference to the PyTorch path);
# 2. their CUDA tests (tests/models/test_triton_kernels.py: each kernel and a whole forward
#    against the PyTorch path);
# 3. the fused kernels with tf32 products, and with tf32x3 and PyTorch's other products in
#    TF32;
# 4. each kernel against PyTorch's operators at SpinConv-All's sizes, five tile choices, tf32x3
#    and tf32 (fused_kernels.py);
# 5. batch 1 with them: a forward and the ASE step (plain, cuda_graph, skin, compiled);
# 6. their errors against the original's fixture outputs (tf32_error.py --triton; SpinConv-All
#    where .device/ocp was carried, see device_wheels.sh).
set -uo pipefail
source "$(dirname "$0")/gpu_lib.sh" "$@"
step_timeout=240
batched=(python3 benchmarks/speed.py --devices cuda --models spinconv_all --sizes --batch 64 256
  --repeats 10 --skip-ase-step)
run "${batched[@]}" --out "$dir/speed_spinconv_pytorch.json"
run "${batched[@]}" --triton tf32x3 --out "$dir/speed_triton_tf32x3.json"
run python3 -m pytest -q tests/models/test_triton_kernels.py -p no:cacheprovider
run "${batched[@]}" --triton tf32 --out "$dir/speed_triton_tf32.json"
run "${batched[@]}" --triton tf32x3 --tf32 --out "$dir/speed_triton_tf32x3_torch_tf32.json"
run python3 benchmarks/fused_kernels.py --out "$dir/fused_kernels_cuda.json"
run python3 benchmarks/speed.py --devices cuda --models spinconv_all --sizes 66 --batch \
  --repeats 20 --triton tf32x3 --out "$dir/speed_triton_batch1.json"
run python3 benchmarks/tf32_error.py --device cuda --triton \
  --models spinconv_small_fc spinconv_small_ec spinconv_all --out "$dir/tf32_error_triton.json"
exit $status
