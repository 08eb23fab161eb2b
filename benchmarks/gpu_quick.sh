#!/usr/bin/env bash
# The short GPU check of the latest changes (a few minutes on one GPU); JSON and logs into DIR.
#
#   bash benchmarks/gpu_quick.sh [DIR]       (AB=FILE: also A/B spinconv.py against FILE)
#
# 0. the fused Triton kernels (benchmarks/gpu_triton.sh: their CUDA tests, timings against the
#    PyTorch path, fixture errors);
# 1. the CUDA tests of the fixed-shape forward and its CUDA-graph replay (tests/test_replay.py,
#    the calculator's cuda_graph relaxations for SpinConv force- and energy-centric and
#    ForceNet);
# 2. speed.py on CUDA: SpinConv-All and ForceNet-All at batch 1 (66 atoms) and batches 64 and
#    256, and the ASE step plain, with cuda_graph, and with cuda_graph and a 1 Å skin, with the
#    replayed forward alone and the largest force difference to the plain step;
# 3. with AB=FILE (another version of forcecalc/models/spinconv.py, e.g.
#    `git show <commit>:forcecalc/models/spinconv.py`, carried in an ignored folder):
#    spinconv_ab.py at batch 1, 64 and 256;
# 4. every other CUDA test (last: the figures come first if time runs short).
# The full set of figures is benchmarks/gpu_figures.sh (much longer).
set -uo pipefail
source "$(dirname "$0")/gpu_lib.sh" "$@"
bash benchmarks/gpu_triton.sh "$dir" || status=1
run python3 -m pytest -q -x tests/test_replay.py tests/test_calculator.py -k "cuda or replay or signature"
run python3 benchmarks/speed.py --devices cuda --sizes 66 --batch 64 256 --repeats 20 \
  --out "$dir/speed_cuda_graph.json"
if [ -n "${AB:-}" ]; then
  run python3 benchmarks/spinconv_ab.py forcecalc/models/spinconv.py "$AB" --device cuda \
    --batch 1 64 256 --repeats 10 --out "$dir/spinconv_ab.json"
fi
run python3 -m pytest -q tests -k "cuda and not replay" -p no:cacheprovider
exit $status
