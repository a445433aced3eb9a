#!/usr/bin/env bash
# The escape experiment of docs/escape.md, end to end, in two parts:
# - mlp (the main experiment): a good-minimum reference, a bad minimum (random-label
#   pre-training, then clean-label fitting), and GD, RS, SA (B = 1, 16, 64, full) with controls
#   (SA at ρ → 0, SA without projection, label-noise GD) from the bad minimum, 3 seeds each,
#   every run full-batch with the one-hot MSE loss and the exact trace logged;
# - cnn (the larger-scale check): the same construction for cnn-s with cross-entropy and
#   minibatches of 100, then SGD, SA (B = 1), RS and the ρ → 0 control from its bad minimum,
#   3 seeds each, compared at equal training loss by tools/escape_report.py.
#
# Usage: bash tools/escape_experiment.sh [OUT_DIR] [DATA_DIR]
#   OUT_DIR   where the run folders go [runs/escape]; the cnn part writes OUT_DIR/cnn
#   DATA_DIR  a cifar-10-batches-bin folder [../shared/data/cifar10-subset]
# Environment: FLATMIN (binary) [target/release/flatmin, built if missing], JOBS (runs at once)
# [2], PART (mlp, cnn or all) [all], STEPS (steps of each mlp escape run) [5000], CNN_EPOCHS
# (epochs of 10 steps of each cnn escape run) [100], SEEDS [1 2 3], ONLY_MINIMA=1 (stop after
# building the minima).
# Then: python tools/escape_report.py OUT_DIR docs and python tools/escape_report.py
# OUT_DIR/cnn docs --experiment cnn (figures and the verdict tables; needs matplotlib). Runs that
# finished are kept: rerunning skips them, an interrupted one resumes.
set -euo pipefail

OUT=${1:-runs/escape}
DATA=${2:-../shared/data/cifar10-subset}
F=${FLATMIN:-target/release/flatmin}
JOBS=${JOBS:-2}
PART=${PART:-all}
STEPS=${STEPS:-5000}
CNN_EPOCHS=${CNN_EPOCHS:-100}
SEEDS=${SEEDS:-"1 2 3"}
case "$PART" in
    mlp | cnn | all) ;;
    *)
        echo "PART must be mlp, cnn or all, not '$PART'" >&2
        exit 2
        ;;
esac
if [ ! -x "$F" ]; then
    cargo build --release -p flatmin
fi
mkdir -p "$OUT"

# Runs a training job with the part's $BASE flags unless its folder holds a finished run;
# resumes an interrupted one.
train() {
    local out=$1
    shift
    if [ -f "$out/summary.json" ]; then
        return 0
    fi
    if [ -f "$out/config.json" ]; then
        "$F" train --resume "$out" --quiet --threads 1
    else
        # shellcheck disable=SC2086
        "$F" train $BASE "$@" --out "$out"
    fi
}

# The main experiment.
mlp_part() {
    # One model, one loss, one data subset for every run: a tanh MLP on 8x8-pooled images
    # (192 -> 128 -> 10, d = 25,994 parameters, more than the 10,000 outputs of 1,000 images, so the
    # minima of the one-hot MSE form a manifold), full-batch steps, float64, exact traces on all
    # 1,000 training images.
    BASE="--model mlp:192,128,10:tanh:pool4 --loss mse --dtype f64 --data $DATA --train-size 1000"
    BASE+=" --test-size 2000 --batch-size 1000 --no-augment --weight-decay 0 --schedule constant"
    BASE+=" --threads 1 --quiet --data-seed 0"

    # Phase 1: the two minima (seed 0), in parallel.
    PRE="--momentum 0.9 --lr 0.1 --eval-every 250 --trace-every 500 --trace-size 1000 --seed 0"
    train "$OUT/good" $PRE --epochs 4000 &
    train "$OUT/random-labels" $PRE --epochs 4000 --random-labels &
    wait
    train "$OUT/bad" $PRE --epochs 4000 --init-from "$OUT/random-labels/model.safetensors"
    if [ "${ONLY_MINIMA:-0}" = 1 ]; then
        echo "minima done: $OUT"
        return 0
    fi

    # Phase 2: the escape runs from the bad minimum, plain full-batch GD steps of rate 0.05 plus
    # each method's perturbation (rates and radii: docs/escape.md, "Choosing ρ and η'"). Full-batch
    # GD depends on the seed only through the order of the images inside the full batch.
    ESC="--momentum 0 --lr 0.05 --epochs $STEPS --eval-every 250 --trace-every 250"
    ESC+=" --trace-size 1000 --init-from $OUT/bad/model.safetensors"
    export BASE ESC
    {
        for s in $SEEDS; do
            echo "gd-s$s --optimizer sgd --seed $s"
            SA="--optimizer sa --rho 0.4 --eta-prime 0.0005 --seed $s"
            echo "sa-b1-s$s $SA --probe-batch 1"
            echo "sa-b16-s$s $SA --probe-batch 16"
            echo "sa-b64-s$s $SA --probe-batch 64"
            echo "sa-full-s$s $SA"
            echo "rs-s$s --optimizer rs --rho 2 --eta-prime 0.02 --seed $s"
            echo "rs-eq-s$s --optimizer rs --rho 2 --eta-prime 0.0005 --seed $s"
            echo "sa-rho0-s$s --optimizer sa --rho 0.0001 --eta-prime 0.0005 --probe-batch 1 --seed $s"
            echo "sa-noproj-s$s $SA --probe-batch 1 --no-project"
            echo "label-noise-s$s --optimizer label-noise --label-noise 0.2 --seed $s"
        done
    } | OUT=$OUT xargs -P "$JOBS" -L 1 bash -c 'train "$OUT/$0" $ESC "$@"'
    echo "done: $OUT (mlp)"
}

# The larger-scale check: cnn-s with cross-entropy (f32, minibatches of 100) on the same 1,000
# images. Cross-entropy has no attained minimum (the loss and the trace keep falling under plain
# SGD), so tools/escape_report.py compares the arms at equal training loss, not at equal steps.
cnn_part() {
    local out=$OUT/cnn
    mkdir -p "$out"
    BASE="--model cnn-s --data $DATA --train-size 1000 --test-size 2000 --batch-size 100"
    BASE+=" --no-augment --weight-decay 0 --schedule constant --threads 1 --quiet --data-seed 0"
    export BASE
    # The minima (seed 0), their fits logged every 20 steps for the trace-against-loss paths.
    local pre="--lr 0.05 --momentum 0.9 --epochs 30 --seed 0"
    local log="--eval-every 2 --trace-every 20 --trace-size 1000"
    train "$out/good" $pre $log &
    train "$out/random-labels" $pre --eval-every 10 --random-labels &
    wait
    train "$out/bad" --lr 0.05 --momentum 0 --epochs 40 --seed 0 $log \
        --init-from "$out/random-labels/model.safetensors"
    if [ "${ONLY_MINIMA:-0}" = 1 ]; then
        echo "minima done: $out"
        return 0
    fi
    # SGD at rate 0.02 from the bad minimum, plus each method's perturbation.
    ESC="--momentum 0 --lr 0.02 --epochs $CNN_EPOCHS --eval-every 10 --trace-every 100"
    ESC+=" --trace-size 1000 --init-from $out/bad/model.safetensors"
    export ESC
    {
        for s in $SEEDS; do
            echo "sgd-s$s --optimizer sgd --seed $s"
            echo "sa-b1-s$s --optimizer sa --rho 0.05 --eta-prime 0.0005 --probe-batch 1 --seed $s"
            echo "rs-s$s --optimizer rs --rho 3 --eta-prime 0.02 --seed $s"
            echo "sa-rho0-s$s --optimizer sa --rho 0.0001 --eta-prime 0.0005 --probe-batch 1 --seed $s"
        done
    } | OUT=$out xargs -P "$JOBS" -L 1 bash -c 'train "$OUT/$0" $ESC "$@"'
    echo "done: $out (cnn)"
}

export -f train
export F
if [ "$PART" != cnn ]; then
    mlp_part
fi
if [ "$PART" != mlp ]; then
    cnn_part
fi
