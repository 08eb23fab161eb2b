#!/usr/bin/env bash
# The fused Triton kernels on one GPU (about eight minutes; part 0 of gpu_quick.sh): JSON and
# logs into DIR.  The headline figure comes first, so that a run cut short still has it.
#
#   bash benchmarks/gpu_triton.sh [DIR]       (BASE=FOLDER: also time another version;
#                                              BUDGET_S=480: stop starting steps after 480 s)
#
# 1. SpinConv-All batched (64 and 256 x 66 atoms; 512 after 4) with the fused kernels, tf32x3
#    products, then the "mixed" precision (speed.py, with their largest force difference to
#    the PyTorch path);
# 2. their errors against the original's fixture outputs (tf32_error.py --triton: tf32x3,
#    mixed, tf32; SpinConv-All where .device/ocp was carried, see device_wheels.sh);
# 3. with BASE=FOLDER (a folder holding another version's forcecalc package, e.g. made by
#    `benchmarks/device_wheels.sh COMMIT` in .device/base): 1 with that package, for a
#    before/after on the same machine;
# 4. their CUDA tests (tests/models/test_triton_kernels.py: each kernel and a whole forward
#    against the PyTorch path; `forcecalc relax --kernels`), the A/B of triton_tiles.py's
#    variants 0-2 (the defaults; Triton's own tf32x3; one spectra product per longitude),
#    then 1 with the A/B's fastest variant where it is not the defaults (by 1% or more; batch
#    64, 256 and 512), then batch 512;
# 5. where the forward's device time goes, kernel by kernel, for tile choices around the
#    defaults (triton_tiles.py, all variants);
# 6. the PyTorch path batched (the baseline of 1);
# 7. batch 1 with them: a forward and the ASE step (plain, cuda_graph, skin, compiled);
# 8. the tile sweep of 5 with the "mixed" precision; each kernel against PyTorch's operators
#    at SpinConv-All's sizes (fused_kernels.py).
set -uo pipefail
source "$(dirname "$0")/gpu_lib.sh" "$@"
step_timeout=240
batched=(python3 benchmarks/speed.py --devices cuda --models spinconv_all --sizes --repeats 10
  --skip-ase-step)
run "${batched[@]}" --batch 64 256 --triton tf32x3 --out "$dir/speed_triton_tf32x3.json"
run "${batched[@]}" --batch 64 256 --triton mixed --out "$dir/speed_triton_mixed.json"
run python3 benchmarks/tf32_error.py --device cuda --triton \
  --models spinconv_small_fc spinconv_all --out "$dir/tf32_error_triton.json"
if [ -n "${BASE:-}" ] && [ ! -f "$BASE/forcecalc/__init__.py" ]; then
  echo "== BASE=$BASE holds no forcecalc package (benchmarks/device_wheels.sh COMMIT makes one)"
  status=1
elif [ -n "${BASE:-}" ]; then
  run env PYTHONPATH="$BASE:${PYTHONPATH:-}" "${batched[@]}" --batch 64 256 --triton tf32x3 \
    --out "$dir/speed_triton_tf32x3_base.json"
fi
run python3 -m pytest -q tests/models/test_triton_kernels.py \
  tests/test_cli.py::test_relax_with_the_fused_kernels_gives_the_pytorch_structures \
  -p no:cacheprovider
run python3 benchmarks/triton_tiles.py --batch 64 --variants 0 1 2 \
  --out "$dir/triton_tiles_ab.json"
# the A/B's fastest variant, where it is not the defaults, timed as in 1
faster=$(python3 -c '
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if "atoms_per_second" in r]
first = next((r for r in rows if r["variant"] == 0), None)
best = max(rows, key=lambda r: r["atoms_per_second"], default=None)
if first and best is not first and best["atoms_per_second"] > 1.01 * first["atoms_per_second"]:
    print(" ".join(f"{k}={v}" for k, v in best["tiles"].items() if first["tiles"][k] != v))
' "$dir/triton_tiles_ab.json" 2>/dev/null)
if [ -n "$faster" ]; then
  run "${batched[@]}" --batch 64 256 512 --triton tf32x3 --kernel-constants $faster \
    --out "$dir/speed_triton_tf32x3_variant.json"
fi
run "${batched[@]}" --batch 512 --triton tf32x3 --out "$dir/speed_triton_tf32x3_512.json"
run "${batched[@]}" --batch 512 --triton mixed --out "$dir/speed_triton_mixed_512.json"
run python3 benchmarks/triton_tiles.py --batch 64 --out "$dir/triton_tiles.json"
run "${batched[@]}" --batch 64 256 --out "$dir/speed_spinconv_pytorch.json"
run python3 benchmarks/speed.py --devices cuda --models spinconv_all --sizes 66 --batch \
  --repeats 20 --triton tf32x3 --out "$dir/speed_triton_batch1.json"
run python3 benchmarks/triton_tiles.py --batch 64 --precision mixed \
  --out "$dir/triton_tiles_mixed.json"
run python3 benchmarks/fused_kernels.py --out "$dir/fused_kernels_cuda.json"
exit $status
