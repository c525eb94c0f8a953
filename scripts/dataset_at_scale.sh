#!/usr/bin/env bash
# Issue 15, item 2: CaloMan's full profile on built-in dataset-2 (or -3) showers, measured.
#
#   bash scripts/dataset_at_scale.sh WORKDIR [ds2|ds3] [TRAIN_SHOWERS] [TEST_SHOWERS]
#
# Simulates TRAIN_SHOWERS (default 100,000, the CaloChallenge's size) and TEST_SHOWERS
# (default 20,000) log-uniform 1 GeV - 1 TeV showers with different seeds, estimates the
# intrinsic dimension on 10,000 of them (DIM_SHOWERS), trains the full profile with that latent
# dimension (and configs/<binning>-full.toml where one exists: dataset 2's layer-energy order,
# dataset 3's streamed, capped budget) under /usr/bin/time -v (wall time and peak RSS in
# WORKDIR/train.log), then runs `caloman benchmark --run` on the held-out file: generation speed (batch 1, 100, 10,000),
# the strong classifier test per incident-energy bin, separation powers and FPD in
# WORKDIR/benchmark/benchmark.md. Each step is skipped when its output exists, so an
# interrupted call picks up where it stopped (training with --resume).
# MODEL_OPTIONS="KEY=VALUE ..." passes each as `caloman train --model-option KEY=VALUE`
# (a new run only; a resumed run keeps its stored settings).
# Do not run it beside another heavy job: the training time is a headline figure.
set -euo pipefail
work=${1:?usage: dataset_at_scale.sh WORKDIR [ds2|ds3] [TRAIN_SHOWERS] [TEST_SHOWERS]}
binning=${2:-ds2}
n_train=${3:-100000}
n_test=${4:-20000}
root=$(cd "$(dirname "$0")/.." && pwd)
caloman="$root/.venv/bin/caloman"
mkdir -p "$work/data"
cd "$work"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

[ -f data/train.h5 ] || "$caloman" -q simulate --binning "$binning" --energies loguniform:1000:1000000 \
    --count "$n_train" --seed 1 --out data/train.h5
[ -f data/test.h5 ] || "$caloman" -q simulate --binning "$binning" --energies loguniform:1000:1000000 \
    --count "$n_test" --seed 2 --out data/test.h5
[ -f dim/dimension.json ] || "$caloman" -q dimension data/train.h5 --out dim --max-showers "${DIM_SHOWERS:-10000}"
if [ ! -f run/model.safetensors ]; then
    if [ -d run ]; then  # a resumed run keeps its stored settings
        settings=(--resume)
    else
        settings=(--profile full --seed 0 --latent-dim-from dim/dimension.json)
        [ -f "$root/configs/$binning-full.toml" ] && settings+=(--config "$root/configs/$binning-full.toml")
        for option in ${MODEL_OPTIONS:-}; do settings+=(--model-option "$option"); done
    fi
    { date -u; /usr/bin/time -v "$caloman" -q train data/train.h5 --out run "${settings[@]}"; date -u; } \
        >> train.log 2>&1
fi
[ -f benchmark/benchmark.md ] || "$caloman" -q benchmark --run run --data data/train.h5 \
    --reference data/test.h5 --profile full --classifier strong --out benchmark
grep -E "Elapsed|Maximum resident" train.log | tail -2
cat benchmark/benchmark.md
