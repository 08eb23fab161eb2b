# The common start of the GPU scripts (gpu_quick.sh, gpu_triton.sh, gpu_figures.sh), sourced
# with their arguments: the repository root as working directory, DIR (the first argument,
# default benchmarks/results) made, a CUDA device required, and run(), which echoes a command,
# runs it (stopped after $step_timeout seconds, default an hour: a hung compile must not use up
# a device lease) and records a failure in $status.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
dir=${1:-benchmarks/results}
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else '$(basename "$0"): no CUDA device is visible to torch')" || exit 1
mkdir -p "$dir"
status=0
step_timeout=3600
run() { echo "== $*"; timeout "$step_timeout" "$@" || status=1; }
