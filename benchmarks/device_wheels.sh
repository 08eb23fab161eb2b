#!/usr/bin/env bash
# The Python packages forcecalc needs that the device tool's GPU image lacks (it has torch,
# numpy, scipy, h5py, matplotlib, tqdm, pyyaml, threadpoolctl and pytest for its Python 3.12),
# as wheels in .whl/ (git-ignored), and the SpinConv-All fixture checkpoint (34 MB, from
# ../shared/fixtures/ocp where present) in .device/ocp/checkpoints/ (git-ignored), to carry to
# a device call (64 MiB at most in all):
#
#   bash benchmarks/device_wheels.sh [COMMIT]   (here, where pip reaches PyPI)
#   run(command="bash benchmarks/device_check.sh", carry=[".whl", ".device"])   (there)
#
# With COMMIT, that commit's forcecalc package also goes to .device/base (for gpu_triton.sh's
# before/after: BASE=.device/base bash benchmarks/device_check.sh DIR benchmarks/gpu_triton.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl ase==3.29.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  -d .whl vesin-torch==0.6.2
ls -l .whl
shared=../shared/fixtures/ocp/checkpoints
if [ -f "$shared/spinconv_all.pt" ]; then
  rm -rf .device/ocp && mkdir -p .device/ocp/checkpoints
  cp "$shared/spinconv_all.pt" .device/ocp/checkpoints/
  ls -l .device/ocp/checkpoints
fi
if [ -n "${1:-}" ]; then
  rm -rf .device/base && mkdir -p .device/base
  git archive "$1" forcecalc | tar -x -C .device/base
  du -sh .device/base
fi
