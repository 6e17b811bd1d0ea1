#!/usr/bin/env bash
# Evaluate PRGS (see `python3 test.py --help` for every flag).
#
# Without arguments: the model that `bash train_reranking.sh` trained last (the newest finished run's
# logs/toy_world_demo/<time>/reranker/best.pth) on the toy world's test split, with pictures of the predictions and
# of the reranking for a few queries and report.html, the page of what reranking changed (open it in any browser).
# Without such a model it says how to get one and stops.
#
# With arguments: test.py with exactly those, e.g.
#   bash test.sh --resume CHECKPOINT                                 # the toy world, generated under ./data
#   bash test.sh --database_folder my/db --queries_folder my/queries --resume CHECKPOINT   # your photos
# MSLS val (the official 740-query protocol) with the reference's released PRGS checkpoint:
#   bash test.sh --dataset_name msls --split val --datasets_folder /path/to/datasets \
#       --resume resume/msls_train_prgs.pt --rerank_batch_size 2
# MSLS test (writes the challenge submission files, no recalls): same with --split test.
# Pitts30k test:
#   bash test.sh --dataset_name pitts30k --datasets_folder /path/to/datasets --resume CHECKPOINT
set -euo pipefail
cd "$(dirname "$0")"
# The project's virtual environment when there is one (README), else python3; $PYTHON overrides both.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if [ "$#" -eq 0 ]; then
  # A run is finished when train_reranking.py has written its results.json; the newest results.json wins.
  MODEL=""
  NEWEST=""
  for RESULTS in logs/toy_world_demo/*/reranker/results.json; do
    if [ -f "$RESULTS" ] && [ -f "$(dirname "$RESULTS")/best.pth" ]; then
      if [ -z "$NEWEST" ] || [ "$RESULTS" -nt "$NEWEST" ]; then
        NEWEST="$RESULTS"
        MODEL="$(dirname "$RESULTS")/best.pth"
      fi
    fi
  done
  if [ -z "$MODEL" ]; then
    echo "no trained toy-world model yet (logs/toy_world_demo/*/reranker/best.pth): run 'bash train_reranking.sh' first (a few minutes on a CPU), or pass --resume CHECKPOINT" >&2
    exit 1
  fi
  echo "evaluating the toy-world demo's model $MODEL"
  set -- --dataset_name toy_world --resume "$MODEL" --num_preds_to_save 5 --rerank_pictures 3 --num_queries_to_save 6
fi
exec "$PYTHON" -u test.py "$@"
