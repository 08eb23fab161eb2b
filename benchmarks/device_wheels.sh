#!/usr/bin/env bash
# The Python packages forcecalc needs that the device tool's GPU image lacks (it has torch,
# numpy, scipy, h5py, matplotlib, tqdm, pyyaml, threadpoolctl and pytest for its Python 3.12),
# as wheels in .whl/ (git-ignored), to carry to a device call:
#
#   bash benchmarks/device_wheels.sh            (here, where pip reaches PyPI)
#   run(command="bash benchmarks/device_check.sh", carry=[".whl"])   (there)
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl ase==3.29.0
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  -d .whl vesin-torch==0.6.2
ls -l .whl
