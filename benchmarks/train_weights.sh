#!/usr/bin/env bash
# Reproduce the shipped weights from scratch: OC20-EMT data, training, packaging, evaluation.
#
#   bash benchmarks/train_weights.sh [DATA_SIZE] [MAX_STEPS]
#
# DATA_SIZE: tiny | small | medium (default small: what the current weights used).
# MAX_STEPS: training steps per model (default 20000; the current weights stopped earlier, at
# the step recorded in weights/README.md, when the session's time ran out: resume a run with
# `forcecalc train --resume --out scratch/runs/NAME --max-steps N`).
# Everything is seeded (data seed 0, training seed 0 in the configs); runs write into scratch/.
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-small}
steps=${2:-20000}
data=scratch/$size
runs=scratch/runs
mkdir -p "$runs"

[ -f "$data/train.h5" ] || forcecalc data oc20emt --size "$size" --out "$data" --seed 0

train() {  # name config
  OMP_NUM_THREADS=1 forcecalc train --config "benchmarks/configs/$2.yaml" \
    --data "$data/train.h5" --val-data "$data/val_id.h5" --max-steps "$steps" \
    --out "$runs/$1" --no-progress
}
train spinconv-fc spinconv-fc &
train forcenet forcenet &
train spinconv-ec spinconv-ec &
wait

declare -A description=(
  [spinconv-fc]="SpinConv force-centric (direct forces), trained on OC20-EMT $size"
  [forcenet]="ForceNet (direct forces), trained on OC20-EMT $size"
  [spinconv-ec]="SpinConv energy-centric (conservative forces, stress; cosine envelope), trained on OC20-EMT $size"
)
for name in spinconv-fc forcenet spinconv-ec; do
  python benchmarks/package_weights.py "$runs/$name/best.pt" "$name" \
    --description "${description[$name]}"
  forcecalc eval s2ef --model "$name" --data "$data"/test_*.h5 --train "$data/train.h5" \
    --max-frames 400 --out "benchmarks/results/eval_s2ef_$name.json"
  forcecalc eval is2rs --model "$name" --data "$data"/test_*.h5 --train "$data/train.h5" \
    --max-systems 12 --out "benchmarks/results/eval_is2rs_$name.json"
  [ "$name" != spinconv-ec ] || python benchmarks/nve_drift.py --model spinconv-ec \
    --data "$data/test_id.h5" --out benchmarks/results/nve_drift_spinconv-ec.json
  python benchmarks/package_weights.py "$runs/$name/best.pt" "$name" \
    --description "${description[$name]}" --s2ef "benchmarks/results/eval_s2ef_$name.json"
  python benchmarks/model_card_table.py "$name"
  python benchmarks/parity_plot.py "$name" "$data/test_id.h5"
done
