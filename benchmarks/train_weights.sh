#!/usr/bin/env bash
# Reproduce the shipped weights from scratch: OC20-EMT data, training, packaging, evaluation.
#
#   bash benchmarks/train_weights.sh [NAME ...]        (default: all three)
#
# Each file's recipe (data size, training steps) is the one its model card in weights/README.md
# reports: the runs stopped on a wall-clock limit, and --max-steps replays them to that step.
#   forcenet     OC20-EMT medium, 3,400 steps of 32 (one H100, 8 min; its card)
#   spinconv-fc  OC20-EMT small, 10,500 steps of 8  (one CPU thread, about 4 h in four runs, resumed)
#   spinconv-ec  OC20-EMT medium, 2,000 steps of 32 (820 on one H100, 1,180 on one CPU thread)
# Override the steps with STEPS=N.  Everything is seeded (data seed 0, training seed 0 in the
# configs, benchmarks/configs/NAME.yaml); runs write into scratch/runs/NAME, data into
# scratch/SIZE.  A killed run continues with
# `forcecalc train --resume --out scratch/runs/NAME --max-steps N`.  Models are evaluated on
# the test splits of the data they were trained on (the splits of different sizes overlap:
# `small`'s test systems are in `medium`'s training split; see benchmarks/oc20emt.md).
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A size=([forcenet]=medium [spinconv-fc]=small [spinconv-ec]=medium)
declare -A steps=([forcenet]=3400 [spinconv-fc]=10500 [spinconv-ec]=2000)
# the file shipped: the run's last model (forcenet, whose last evaluation was its best) or its
# best validation model
declare -A shipped=([forcenet]=final.pt [spinconv-fc]=best.pt [spinconv-ec]=best.pt)
names=("${@:-forcenet spinconv-fc spinconv-ec}")
read -r -a names <<< "${names[*]}"
runs=scratch/runs
mkdir -p "$runs"

for name in "${names[@]}"; do
  data=scratch/${size[$name]}
  [ -f "$data/train.h5" ] || forcecalc data oc20emt --size "${size[$name]}" --out "$data" --seed 0
  OMP_NUM_THREADS=1 forcecalc train --config "benchmarks/configs/$name.yaml" \
    --data "$data/train.h5" --val-data "$data/val_id.h5" --max-steps "${STEPS:-${steps[$name]}}" \
    --out "$runs/$name" --no-progress
done

declare -A description=(
  [spinconv-fc]="SpinConv force-centric (direct forces), trained on OC20-EMT small"
  [forcenet]="ForceNet (direct forces), trained on OC20-EMT medium (one H100, 8 min)"
  [spinconv-ec]="SpinConv energy-centric (conservative forces, stress; cosine envelope, 4 Å cutoff), trained on OC20-EMT medium"
)
for name in "${names[@]}"; do
  data=scratch/${size[$name]}
  python benchmarks/package_weights.py "$runs/$name/${shipped[$name]}" "$name" \
    --description "${description[$name]}"
  forcecalc eval s2ef --model "$name" --data "$data"/test_*.h5 --train "$data/train.h5" \
    --max-frames 400 --out "benchmarks/results/eval_s2ef_$name.json"
  forcecalc eval is2rs --model "$name" --data "$data"/test_*.h5 --train "$data/train.h5" \
    --max-systems 12 --out "benchmarks/results/eval_is2rs_$name.json"
  [ "$name" != spinconv-ec ] || python benchmarks/nve_drift.py --model spinconv-ec \
    --data "$data/test_id.h5" --out benchmarks/results/nve_drift_spinconv-ec.json
  python benchmarks/package_weights.py "$runs/$name/${shipped[$name]}" "$name" \
    --description "${description[$name]}" --s2ef "benchmarks/results/eval_s2ef_$name.json"
  python benchmarks/model_card_table.py "$name"
  python benchmarks/parity_plot.py "$name" "$data/test_id.h5"
done
