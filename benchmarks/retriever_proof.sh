#!/usr/bin/env bash
# Does the PRGS reranker lift another retriever's shortlist? On the toy world of seed $SEED (default 0):
#   A  fit PRGS's own global descriptor (deit_micro, the reranker's backbone), as the demo (train_reranking.sh) does
#   B  fit a second, independent global model, the retriever in front: $RETRIEVER (default resnet18) is
#        resnet18    the same global stage on a ResNet-18 (another architecture)
#        deit_micro  the same global stage and architecture as A from another seed (SEED + 1000: other initial
#                    weights, other tuples)
#   mine hard negatives with B, served as a torch.hub model (this repository's hubconf.py, entry prgs_global)
#      through --global_model, so the negatives are the ones B confuses
#   R  train local_head + reranker on A's frozen backbone with B's hard negatives, validating on B's shortlist
#   test R behind B twice: through --global_model (B's descriptors searched with faiss), and through --candidates
#      (B's ranked list, as predictions.csv of a test.py run of B, read from the file)
# and print one line per route: test R@1 of B's shortlist, of R reranking it, and the margin with its 95 %
# paired-bootstrap interval over the test queries (metrics.paired_bootstrap).
#
#   SEED=1 RETRIEVER=deit_micro bash benchmarks/retriever_proof.sh   # logs/retriever_proof/seed_1/deit_micro/
#   SEED=2 R_EPOCHS=10 bash benchmarks/retriever_proof.sh   # the reranker for 10 epochs instead of 5, in
#                                                            # logs/retriever_proof/seed_2/resnet18/reranker_10_epochs/
#
# Seed 0 uses the demo's world in data/, seed N data/seed_N/. A goes to logs/retriever_proof/seed_N/A (shared by the
# retrievers), the rest to logs/retriever_proof/seed_N/$RETRIEVER/<step>; a finished step (its results.json, or the
# mined file) is reused and an interrupted fit resumes from its last.pth, so an interrupted proof continues.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SEED="${SEED:-0}"
if ! [[ "$SEED" =~ ^[0-9]+$ ]]; then echo "error: SEED must be a non-negative integer, got '$SEED'" >&2; exit 2; fi
if [ "$SEED" = 0 ]; then D=data; else D="data/seed_$SEED"; fi
RETRIEVER="${RETRIEVER:-resnet18}"
case "$RETRIEVER" in
  resnet18) B_FLAGS=(--backbone resnet18) ;;
  deit_micro) B_FLAGS=(--seed "$((SEED + 1000))") ;;  # after COMMON's --seed: the last one counts
  *) echo "error: RETRIEVER must be resnet18 or deit_micro, got '$RETRIEVER'" >&2; exit 2 ;;
esac
R_EPOCHS="${R_EPOCHS:-5}"  # the reranker's epochs (cosine schedule over all of them)
if ! [[ "$R_EPOCHS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: R_EPOCHS must be a positive integer, got '$R_EPOCHS'" >&2; exit 2
fi
A="logs/retriever_proof/seed_$SEED/A"
L="logs/retriever_proof/seed_$SEED/$RETRIEVER"
RL="$L"  # the reranker's steps; another R_EPOCHS than 5 keeps its own
if [ "$R_EPOCHS" != 5 ]; then RL="$L/reranker_${R_EPOCHS}_epochs"; fi
COMMON=(--dataset_name toy_world --datasets_folder "$D" --num_workers 1 --seed "$SEED")
# The demo's recipe for a global model fitted from scratch on a CPU (train_reranking.sh explains the values).
FIT=(--train_stage global --backbone_weights none --mining full --neg_samples_num 1000 --negs_num_per_query 5
     --margin 0.5 --lr 3e-4 --queries_per_epoch 240 --cache_refresh_rate 240 --train_batch_size 8 --epochs_num 4
     --patience 4)
RETRIEVER_B=(--global_model .:prgs_global --global_model_kwargs "weights=$L/B/best.pth")

step() {  # step NAME FILE COMMAND...: run COMMAND unless FILE exists (a finished step), logging to $LOGS/NAME.log
  local name=$1 done_file=$2
  shift 2
  if [ -f "$done_file" ]; then echo "== $name: done before ($done_file)"; return; fi
  echo "== $name"
  local log="$LOGS/$name.log"
  "$@" > "$log" 2>&1 || { echo "error: $name failed; see $log" >&2; tail -5 "$log" >&2; exit 1; }
}

continued() {  # continued FOLDER: an interrupted training run in FOLDER resumes from its last.pth, else starts over
  if [ -f "$1/last.pth" ]; then echo --resume "$1/last.pth"; else echo --overwrite; fi
}

mkdir -p "$L" "$RL" "$(dirname "$A")"
LOGS="$L"
"$PYTHON" -m places.toy_world --datasets_folder "$D" --seed "$SEED" > "$L/world.log" 2>&1
# shellcheck disable=SC2046  # continued's words are two flags
step A "$A/results.json" "$PYTHON" -u train_reranking.py "${COMMON[@]}" "${FIT[@]}" --output_folder "$A" \
  $(continued "$A")
# shellcheck disable=SC2046
step B "$L/B/results.json" "$PYTHON" -u train_reranking.py "${COMMON[@]}" "${FIT[@]}" "${B_FLAGS[@]}" \
  --output_folder "$L/B" $(continued "$L/B")
step B_mining "$L/B_hn.npz" "$PYTHON" -u pre_compute_mining.py "${COMMON[@]}" --resume "$A/best.pth" \
  "${RETRIEVER_B[@]}" --num_hard_negatives 50 --output "$L/B_hn.npz" --output_folder "$L/B_mining" --overwrite
TEST=(--dataset_name toy_world --datasets_folder "$D" --num_workers 1 --split test --rerank_top 20 --overwrite)
step B_test "$L/B_test/results.json" "$PYTHON" -u test.py "${TEST[@]}" --resume "$L/B/best.pth" \
  --output_folder "$L/B_test"
LOGS="$RL"
step R "$RL/R/results.json" "$PYTHON" -u train_reranking.py "${COMMON[@]}" --train_stage reranker \
  --resume "$A/best.pth" "${RETRIEVER_B[@]}" --mining global --hard_negatives "$L/B_hn.npz" --neg_hardness 30 \
  --negs_num_per_query 8 --queries_per_epoch 960 --cache_refresh_rate 480 --train_batch_size 8 \
  --epochs_num "$R_EPOCHS" --patience "$R_EPOCHS" --lr 1e-3 --lr_schedule cosine --warmup_epochs 0 \
  --cache_frozen_backbone --output_folder "$RL/R" --overwrite
step R_via_global_model "$RL/R_via_global_model/results.json" "$PYTHON" -u test.py "${TEST[@]}" \
  --resume "$RL/R/best.pth" "${RETRIEVER_B[@]}" --output_folder "$RL/R_via_global_model"
step R_on_B_candidates "$RL/R_on_B_candidates/results.json" "$PYTHON" -u test.py "${TEST[@]}" \
  --resume "$RL/R/best.pth" --candidates "$L/B_test/predictions.csv" --output_folder "$RL/R_on_B_candidates"

"$PYTHON" - "$SEED" "$RETRIEVER, reranker $R_EPOCHS epochs" "$RL/R_via_global_model" "$RL/R_on_B_candidates" <<'EOF'
import sys
from pathlib import Path

from metrics import paired_bootstrap
from outputs import read_top1_hits

seed, retriever_name = sys.argv[1:3]
for route, folder in (("--global_model", sys.argv[3]), ("--candidates", sys.argv[4])):
    hits = read_top1_hits(Path(folder) / "predictions.csv")
    retriever, reranked = hits["global"], hits["reranked"]
    margin, lower, upper = paired_bootstrap(reranked, retriever)
    print(
        f"seed {seed}, {retriever_name} ({route}, {len(retriever)} test queries): test R@1 of the retriever "
        f"{100 * retriever.mean():.2f}, PRGS reranker on its top 20 {100 * reranked.mean():.2f}, "
        f"margin {margin:+.2f} [{lower:+.2f}, {upper:+.2f}]"
    )
EOF
