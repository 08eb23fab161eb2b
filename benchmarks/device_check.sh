#!/usr/bin/env bash
# One call on a device-tool GPU machine: install the carried wheels (benchmarks/device_wheels.sh)
# beside its image's torch, then benchmarks/gpu_quick.sh (every CUDA test of the repository and
# the short GPU figures), its log and JSON into DIR (default $OUT; there the JSON is packed
# into results.tar.gz at the end).  A carried .device/ocp (the SpinConv-All fixture
# checkpoint) serves the tests and benchmarks that read large fixtures.
#
#   bash benchmarks/device_check.sh [DIR [SCRIPT]]   (SCRIPT: default benchmarks/gpu_quick.sh;
#                                                    benchmarks/gpu_triton.sh for its part 0)
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${1:-${OUT:-benchmarks/results}}
mkdir -p "$dir"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .device/ocp ]; then export FORCECALC_OCP_FIXTURES="$PWD/.device/ocp"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$dir/gpu.txt" 2>&1
script=${2:-benchmarks/gpu_quick.sh}
bash "$script" "$dir" 2>&1 | tee "$dir/$(basename "$script" .sh).log" | tail -40
status=${PIPESTATUS[0]}
# the device tool returns at most 8 files from $OUT: there, the JSON goes into one archive
# (the log has every table too)
if [ -n "${OUT:-}" ] && [ "${dir%/}" = "${OUT%/}" ]; then
  (cd "$dir" && shopt -s nullglob && json=(*.json) && [ ${#json[@]} -gt 0 ] &&
    tar -czf results.tar.gz --remove-files "${json[@]}")
fi
exit "$status"
