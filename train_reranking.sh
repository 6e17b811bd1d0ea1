#!/usr/bin/env bash
# Train PRGS (see `python3 train_reranking.py --help` for every flag).
#
# Without arguments: the whole pipeline on the built-in toy world, on a CPU in a few minutes (docs/toy_world.md):
#   0. make the toy world of seed $SEED (default 0) unless it is there
#   1. fit the global descriptor (DeiT, triplet loss) on it, unless <demo folder>/global_model holds a
#      finished fit (its results.json); an interrupted fit is resumed
#   2. mine hard negatives with it (pre_compute_mining.py)
#   3. train local_head + reranker on top of it (backbone frozen), validating every epoch
#   4. test the best model: test R@1 of global and reranked retrieval before and after training, and the margins
#      with their 95 % confidence intervals (paired bootstrap over the test queries)
# SEED=N seeds both the world and the training: seed 0 uses data/ and logs/toy_world_demo/, seed N uses
# data/seed_N/ and logs/toy_world_demo/seed_N/. The trained model lands in <demo folder>/<time>/reranker/best.pth,
# and <demo folder>/latest points at the latest run. benchmarks/demo_seeds.sh runs seeds 0 1 2 and summarises them.
#
# With arguments: the reference's MSLS recipe (its train_reranking.sh) plus your flags, e.g.
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

SEED="${SEED:-0}"
if ! [[ "$SEED" =~ ^[0-9]+$ ]]; then echo "error: SEED must be a non-negative integer, got '$SEED'" >&2; exit 2; fi
# Seed 0 (the default) uses data/ and logs/toy_world_demo/, what test.py and the README point to; another seed gets
# its own world and runs, so seeds never overwrite each other.
if [ "$SEED" = 0 ]; then DATA=data; DEMO=logs/toy_world_demo; else DATA="data/seed_$SEED"; DEMO="logs/toy_world_demo/seed_$SEED"; fi
RUN="$DEMO/$(date +%Y-%m-%d_%H-%M-%S)"
GLOBAL_MODEL="$DEMO/global_model"
COMMON=(--dataset_name toy_world --datasets_folder "$DATA" --num_workers 1 --seed "$SEED")
START=$SECONDS

echo "== 0/3 the toy world of seed $SEED in $DATA/toy_world (made once, about 2400 images)"
"$PYTHON" -m places.toy_world --datasets_folder "$DATA" --seed "$SEED"

# The global model is reused only when its run finished (results.json is written at the very end of a run) on the
# world there now (a world made again, e.g. by a newer generator, is newer than the fit). An interrupted fit is
# resumed from its own last.pth instead.
if [ -f "$GLOBAL_MODEL/results.json" ] && [ "$DATA/toy_world/toy_world.json" -nt "$GLOBAL_MODEL/results.json" ]; then
  echo "== the toy world in $DATA was made after $GLOBAL_MODEL: fitting the global descriptor again"
  rm -rf "$GLOBAL_MODEL"
fi
if [ ! -f "$GLOBAL_MODEL/results.json" ] || grep -q '"stopped": "max_steps"' "$GLOBAL_MODEL/results.json"; then
  RESUME=()
  if [ -f "$GLOBAL_MODEL/last.pth" ]; then RESUME=(--resume "$GLOBAL_MODEL/last.pth"); fi
  echo "== 1/3 fitting the global descriptor on the toy world (saved in $GLOBAL_MODEL, reused next time)"
  # From scratch on a CPU: the hardest negatives of the whole database and a margin of 0.5; lr 3e-4 (at 1e-3 the
  # descriptors collapse). The best of 4 short epochs on val is kept.
  "$PYTHON" -u train_reranking.py "${COMMON[@]}" --train_stage global --backbone_weights none \
    --mining full --neg_samples_num 1000 --negs_num_per_query 5 --margin 0.5 --lr 3e-4 \
    --queries_per_epoch 240 --cache_refresh_rate 240 --train_batch_size 8 --epochs_num 4 --patience 4 \
    ${RESUME[@]+"${RESUME[@]}"} --output_folder "$GLOBAL_MODEL"
else
  echo "== 1/3 global descriptor: reusing $GLOBAL_MODEL/best.pth"
fi

echo "== 2/3 mining hard negatives with it"
"$PYTHON" -u pre_compute_mining.py "${COMMON[@]}" --resume "$GLOBAL_MODEL/best.pth" --num_hard_negatives 50 \
  --output "$RUN/hard_negatives.npz" --output_folder "$RUN/mining"

echo "== 3/3 training local_head + reranker (backbone frozen, its outputs cached), then testing"
# No warm-up and lr 1e-3 from the first step: the reranker leaves its ln 2 start after about 70 steps
# (docs/toy_world.md explains why), then 5 epochs of 120 steps with a cosine decay.
"$PYTHON" -u train_reranking.py "${COMMON[@]}" --train_stage reranker --resume "$GLOBAL_MODEL/best.pth" \
  --mining global --hard_negatives "$RUN/hard_negatives.npz" --neg_hardness 30 --negs_num_per_query 8 \
  --queries_per_epoch 960 --cache_refresh_rate 480 --train_batch_size 8 --epochs_num 5 --patience 5 \
  --lr 1e-3 --lr_schedule cosine --warmup_epochs 0 --cache_frozen_backbone --test_before_training \
  --output_folder "$RUN/reranker"
ln -sfn "$(basename "$RUN")" "$DEMO/latest"
echo "trained model: $RUN/reranker/best.pth (also $DEMO/latest/reranker/best.pth); results: $RUN/reranker/results.json"
echo "demo of seed $SEED finished in $((SECONDS - START)) s"
