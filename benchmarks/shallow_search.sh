#!/usr/bin/env bash
# Issue 18, "find out with the platform": search VirFace's VirInstance variants and their weights
# (search_spaces/virface.yaml: vi_generator, vi_centre_grad, vi_gen_grad, vi_to_backbone,
# gen_target_grad, vi_weight, vi_warmup_epochs, cov_*, ...) on the shallow-data benchmark's data,
# against VirClass and the baseline searched at the same budget (--compare), each arm's winner
# chosen on validation pairs, then retrained with --seeds seeds and reported on test pairs
# (paired over seeds and, by bootstrap, over pairs). Nothing here is chosen on a test pair.
#
#   benchmarks/shallow_search.sh                      # experiments/shallow_search, ~1 h on 2 cores
#   STORAGE=/tmp/x NAME=try SEEDS=3 TRIALS=6 benchmarks/shallow_search.sh
#
# The data: benchmarks/shallow_data.py's "full" plan (50 deep identities x 40 images, 2,000
# shallow identities x 1-3 images, 400 validation identities, 3,000 validation pairs per set),
# except the test pair sets: 6,000 pairs each (scored every epoch by the platform; the benchmark
# scores 20,000 once per run). The chain: pretrain (its space's 4 trials) and the generator (its
# space, selecting on identity keep) with PRE_EPOCHS epochs, then the three arms.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STORAGE=${STORAGE:-experiments}
NAME=${NAME:-shallow_search}
SEEDS=${SEEDS:-5}
TRIALS=${TRIALS:-8}
EPOCHS=${EPOCHS:-5}
PRE_EPOCHS=${PRE_EPOCHS:-12}
AT_ONCE=${AT_ONCE:-2}
DATA=(--synthetic n_labeled_ids=50 --synthetic images_per_labeled_id=40
      --synthetic n_unlabeled_ids=2000 --synthetic n_val_ids=400 --synthetic val_pairs=3000
      --synthetic n_test_ids=2000 --synthetic test_pairs=6000)
COMMON=(--storage "$STORAGE" --name "$NAME" --max_concurrent "$AT_ONCE" --quiet "${DATA[@]}")

# 1. The chain up to the generator (its own budget; reused when its manifest exists).
"$PY" tune/run_search.py --stage generator --max_epoch "$PRE_EPOCHS" "${COMMON[@]}"
# 2. The three arms at one budget, and the seeds.
"$PY" tune/run_search.py --stage virface --compare virclass,baseline --seeds "$SEEDS" \
    --num_samples "$TRIALS" --max_epoch "$EPOCHS" "${COMMON[@]}"
