# The common start of the GPU scripts (gpu_quick.sh, gpu_triton.sh, gpu_figures.sh), sourced
# with their arguments: the repository root as working directory, DIR (the first argument,
# default benchmarks/results) made, a CUDA device required, and run(), which echoes a command,
# runs it (stopped after $step_timeout seconds, default an hour: a hung compile must not use up
# a device lease) and records a failure in $status.  With BUDGET_S set, no step runs past that
# many seconds from the script's start (later steps are skipped, saying so): a device call's
# time limit then never cuts the script off before its results are packed.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
dir=${1:-benchmarks/results}
python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else '$(basename "$0"): no CUDA device is visible to torch')" || exit 1
mkdir -p "$dir"
status=0
step_timeout=3600
run() {
  local limit=$step_timeout
  if [ "${BUDGET_S:-0}" -gt 0 ]; then
    limit=$((BUDGET_S - SECONDS < step_timeout ? BUDGET_S - SECONDS : step_timeout))
    if [ "$limit" -le 10 ]; then
      echo "== skipped (BUDGET_S=$BUDGET_S reached): $*"
      return
    fi
  fi
  echo "== $*"
  timeout "$limit" "$@" || status=1
}
