#!/usr/bin/env bash
# Train PRGS (see `python3 train_reranking.py --help` for every flag).
#
# Without arguments: the whole pipeline on the built-in toy world, on a CPU in a few minutes:
#   1. fit the global descriptor (DeiT, triplet loss) on the toy world, unless logs/toy_world_demo/global_model
#      holds a finished fit (its results.json); an interrupted fit is resumed
#   2. mine hard negatives with it (pre_compute_mining.py)
#   3. train local_head + reranker on top of it (backbone frozen), validating every epoch
#   4. test the best model, printing global and reranked recalls before and after training
#
# With arguments: the reference's MSLS recipe (SPEC 5) plus your flags, e.g.
#   bash train_reranking.sh --datasets_folder /path/to/datasets --resume resume/msls_v2_deits.pth \
#       --hard_negatives result/msls_hard_negatives.npz
# (make the hard-negative file first: python3 pre_compute_mining.py --dataset_name msls --datasets_folder ... \
#  --resume resume/msls_v2_deits.pth). Later flags override the recipe's.
set -euo pipefail
cd "$(dirname "$0")"
# The project's virtual environment when there is one (README), else python3; $PYTHON overrides both.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [ "$#" -gt 0 ]; then
  exec "$PYTHON" -u train_reranking.py --dataset_name msls --train_stage reranker --mining global \
    --neg_hardness 100 --negs_num_per_query 18 --lr 0.0004 --warmup_epochs 0 --epochs_num 50 --patience 3 \
    --queries_per_epoch 50000 --cache_refresh_rate 10000 --train_batch_size 8 --infer_batch_size 64 \
    --rerank_batch_size 4 --local_dim 128 --num_kept_nodes 1000 --temperature 0.5 --seed 42 --num_workers 4 \
    --save_dir msls_reranker "$@"
fi

DEMO=logs/toy_world_demo
RUN="$DEMO/$(date +%Y-%m-%d_%H-%M-%S)"
GLOBAL_MODEL="$DEMO/global_model"
COMMON=(--dataset_name toy_world --num_workers 1 --seed 0)

# The global model is reused only when its run finished: results.json is written at the very end of a run. An
# interrupted fit is resumed from its own last.pth instead.
if [ ! -f "$GLOBAL_MODEL/results.json" ] || grep -q '"stopped": "max_steps"' "$GLOBAL_MODEL/results.json"; then
  RESUME=()
  if [ -f "$GLOBAL_MODEL/last.pth" ]; then RESUME=(--resume "$GLOBAL_MODEL/last.pth"); fi
  echo "== 1/3 fitting the global descriptor on the toy world (saved in $GLOBAL_MODEL, reused next time)"
  # From scratch on a CPU: the hardest negatives of the whole database, and a margin of 0.5 (with the reference's
  # 0.1 this short fit collapses); the best of 4 short epochs on val is kept.
  "$PYTHON" -u train_reranking.py "${COMMON[@]}" --train_stage global --backbone_weights none \
    --mining full --neg_samples_num 1000 --negs_num_per_query 5 --margin 0.5 --lr 1e-3 \
    --queries_per_epoch 240 --cache_refresh_rate 240 --train_batch_size 8 --epochs_num 4 --patience 4 \
    ${RESUME[@]+"${RESUME[@]}"} --output_folder "$GLOBAL_MODEL"
else
  echo "== 1/3 global descriptor: reusing $GLOBAL_MODEL/best.pth"
fi

echo "== 2/3 mining hard negatives with it"
"$PYTHON" -u pre_compute_mining.py "${COMMON[@]}" --resume "$GLOBAL_MODEL/best.pth" --num_hard_negatives 50 \
  --output "$RUN/hard_negatives.npz" --output_folder "$RUN/mining"

echo "== 3/3 training local_head + reranker (backbone frozen, its outputs cached), then testing"
"$PYTHON" -u train_reranking.py "${COMMON[@]}" --train_stage reranker --resume "$GLOBAL_MODEL/best.pth" \
  --mining global --hard_negatives "$RUN/hard_negatives.npz" --neg_hardness 30 --negs_num_per_query 8 \
  --queries_per_epoch 240 --cache_refresh_rate 240 --train_batch_size 8 --epochs_num 20 --patience 20 \
  --lr 1e-3 --lr_schedule cosine --warmup_epochs 3 --cache_frozen_backbone --test_before_training \
  --output_folder "$RUN/reranker"
echo "results: $RUN/reranker/results.json"
