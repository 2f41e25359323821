#!/bin/bash
# The unseen-datasets check (BENCHMARKS.md, "Feature datasets the package had not seen"): build the two datasets, train
# every method with `dmil train` defaults on each (seeds 0-2, one run at a time), evaluate on the degraded test sets,
# summarise. Usage: UNSEEN_DIR=/tmp/unseen bash benchmarks/unseen/run.sh   (about 40 minutes on 2 CPU cores)
# METHODS="dmil" retrains only those methods (the other runs already in $UNSEEN_DIR/runs are summarised with them);
# TRAIN_ARGS="--config-arg dropout=0.5" adds options to every `dmil train`.
set -euo pipefail
export UNSEEN_DIR=${UNSEEN_DIR:-/tmp/unseen} OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$UNSEEN_DIR/runs"
python "$here/make_datasets.py"
for X in A B; do
  for M in ${METHODS:-dmil joint joint_robust ensemble i2moe}; do
    for S in 0 1 2; do
      out=$UNSEEN_DIR/runs/$X-$M-s$S
      # joint_robust is the benchmark's row: joint learning with DMIL's corruption and modality dropout
      if [ $M = joint_robust ]; then args=(--method joint --train-corruption 0.15 --modality-dropout 0.1); else args=(--method $M); fi
      dmil train --dataset "$UNSEEN_DIR/$X" "${args[@]}" --seed $S --output-dir "$out" --threads 1 --overwrite ${TRAIN_ARGS:-} > "$out.train.log" 2>&1
      dmil evaluate --model "$out" --dataset "$UNSEEN_DIR/$X" --degraded --kinds missing noise blank partial \
        --output "$out.evaluate.json" > "$out.evaluate.log" 2>&1
    done
  done
done
python "$here/summarize.py" > "$UNSEEN_DIR/summary.txt"
