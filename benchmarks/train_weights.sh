#!/usr/bin/env bash
# Reproduce the shipped weights from scratch: OC20-EMT data, training, packaging, evaluation.
#
#   bash benchmarks/train_weights.sh [NAME ...]        (default: all three)
#
# Each file's recipe is the one its model card in weights/README.md reports (the runs stopped
# on wall-clock limits and were resumed; --max-steps replays them to the steps shipped):
#   forcenet     OC20-EMT medium, 3,400 steps of 32 (one H100, 8 min), then the same run resumed
#                with a cosine learning rate to 1e-5 at step 4,400 (on a CPU, two threads), then
#                fine-tuned for 1,500 steps on medium plus 20,000 close-contact frames
#                (benchmarks/contact_frames.py; benchmarks/configs/forcenet-contacts.yaml),
#                then 1,000 more with 8,000 closer ones (down to 0.45 Å)
#   spinconv-fc  OC20-EMT small, 10,500 steps of 8 (benchmarks/configs/spinconv-fc.yaml), then
#                fine-tuned on medium with a 6,000-step cosine learning rate from 3e-4
#                (benchmarks/configs/spinconv-fc-medium.yaml); one CPU thread, about 5.5 h.
#                The shipped run was stopped after its step-5,000 evaluation (lr 3e-5 by
#                then); this replay runs all 6,000 steps and ships the best validation model
#   spinconv-ec  OC20-EMT medium, 2,000 steps of 32 (plateau schedule, still at lr 1e-3), then
#                the same run resumed with a cosine learning rate to 1e-5 at step 2,700
#                (820 steps on one H100, the rest on one CPU thread)
# STEPS=N replaces the step count of each model's last stage.
# Everything is seeded (data seed 0, training seed 0 in the configs).  Runs write into
# scratch/runs/NAME, data into scratch/SIZE.  A killed run continues with
# `forcecalc train --resume --out scratch/runs/NAME --max-steps N`.  Every model is evaluated
# on OC20-EMT medium's test splits (the sizes share systems: `small`'s in-domain test systems
# are in `medium`'s training split, see benchmarks/oc20emt.md).
set -euo pipefail
cd "$(dirname "$0")/.."
names=("${@:-forcenet spinconv-fc spinconv-ec}")
read -r -a names <<< "${names[*]}"
runs=scratch/runs
mkdir -p "$runs"
export OMP_NUM_THREADS=1

data() {  # data SIZE: generate OC20-EMT SIZE once
  [ -f "scratch/$1/train.h5" ] || forcecalc data oc20emt --size "$1" --out "scratch/$1" --seed 0
}
train() {  # train CONFIG SIZE OUT STEPS [FLAG ...]
  local config=$1 size=$2 out=$3 steps=$4
  shift 4
  data "$size"
  forcecalc train --config "$config" --data "scratch/$size/train.h5" \
    --val-data "scratch/$size/val_id.h5" --max-steps "$steps" --out "$out" --no-progress "$@"
}

declare -A shipped description
for name in "${names[@]}"; do
  case $name in
    forcenet)
      train benchmarks/configs/forcenet.yaml medium "$runs/forcenet" 3400
      forcecalc train --resume --out "$runs/forcenet" --scheduler cosine --min-lr 1e-5 \
        --max-steps 4400 --val-max-frames 500 --eval-every 250 --no-progress
      [ -f scratch/medium/contacts.h5 ] || python benchmarks/contact_frames.py \
        scratch/medium/train.h5 --out scratch/medium/contacts.h5 --frames 20000 --seed 0
      forcecalc train --config benchmarks/configs/forcenet-contacts.yaml \
        --init-checkpoint "$runs/forcenet/best.pt" --out "$runs/forcenet-contacts" --no-progress
      [ -f scratch/medium/contacts_deep.h5 ] || python benchmarks/contact_frames.py \
        scratch/medium/train.h5 --out scratch/medium/contacts_deep.h5 --frames 8000 --seed 2 \
        --min-ratio 0.3 --max-ratio 0.65 --min-distance 0.45 --closest 0.42
      forcecalc train --config benchmarks/configs/forcenet-contacts.yaml \
        --init-checkpoint "$runs/forcenet-contacts/best.pt" --data scratch/medium/train.h5 \
        scratch/medium/contacts.h5 scratch/medium/contacts_deep.h5 --lr 1e-4 \
        --warmup-steps 50 --max-steps "${STEPS:-1000}" --out "$runs/forcenet-deep" --no-progress
      shipped[$name]=$runs/forcenet-deep/best.pt
      description[$name]="ForceNet (direct forces), trained on OC20-EMT medium (one H100, 8 min, then 1,000 steps on a CPU), fine-tuned with 28,000 close-contact frames (2,500 steps on a CPU)"
      ;;
    spinconv-fc)
      train benchmarks/configs/spinconv-fc.yaml small "$runs/spinconv-fc" 10500
      train benchmarks/configs/spinconv-fc-medium.yaml medium "$runs/spinconv-fc-medium" \
        "${STEPS:-6000}" --init-checkpoint "$runs/spinconv-fc/best.pt"
      shipped[$name]=$runs/spinconv-fc-medium/best.pt
      description[$name]="SpinConv force-centric (direct forces), trained on OC20-EMT small, fine-tuned on medium"
      ;;
    spinconv-ec)
      train benchmarks/configs/spinconv-ec.yaml medium "$runs/spinconv-ec" 2000
      forcecalc train --resume --out "$runs/spinconv-ec" --scheduler cosine --min-lr 1e-5 \
        --max-steps "${STEPS:-2700}" --no-progress
      shipped[$name]=$runs/spinconv-ec/best.pt
      description[$name]="SpinConv energy-centric (conservative forces, stress; cosine envelope, 4 Å cutoff), trained on OC20-EMT medium"
      ;;
    *) echo "unknown name: $name (forcenet, spinconv-fc, spinconv-ec)" >&2; exit 2 ;;
  esac
done

for name in "${names[@]}"; do
  test=(scratch/medium/test_*.h5)
  python benchmarks/package_weights.py "${shipped[$name]}" "$name" \
    --description "${description[$name]}"
  # the relaxation model on larger samples (1,000 frames, 30 relaxations per split)
  frames=400 systems=12
  [ "$name" != spinconv-fc ] || frames=1000 systems=30
  forcecalc eval s2ef --model "$name" --data "${test[@]}" --train scratch/medium/train.h5 \
    --max-frames "$frames" --out "benchmarks/results/eval_s2ef_$name.json"
  forcecalc eval is2rs --model "$name" --data "${test[@]}" --train scratch/medium/train.h5 \
    --max-systems "$systems" --out "benchmarks/results/eval_is2rs_$name.json"
  [ "$name" != spinconv-ec ] || python benchmarks/nve_drift.py --model spinconv-ec \
    --data scratch/medium/test_id.h5 --out benchmarks/results/nve_drift_spinconv-ec.json
  python benchmarks/package_weights.py "${shipped[$name]}" "$name" \
    --description "${description[$name]}" --s2ef "benchmarks/results/eval_s2ef_$name.json"
  python benchmarks/model_card_table.py "$name"
  python benchmarks/parity_plot.py "$name" scratch/medium/test_id.h5 --out "weights/$name-parity.png"
done
