#!/usr/bin/env bash
# Run the toy-world demo (bash train_reranking.sh) from scratch for several seeds and print one line per seed:
# wall time, the load average at its start, test R@1 of global retrieval and of the reranker before and after
# training, and the trained reranker's margin over global retrieval with its 95 % confidence interval.
#
#   bash benchmarks/demo_seeds.sh            # seeds 0 1 2
#   bash benchmarks/demo_seeds.sh 3 4        # other seeds
#   KEEP=1 bash benchmarks/demo_seeds.sh     # reuse each seed's world and global model if they are there
#
# From scratch means: each seed's toy world (data/toy_world or data/seed_N/toy_world) and global model
# (logs/toy_world_demo[/seed_N]/global_model) are deleted first, so the time covers the whole demo as a new user
# runs it. The full logs go to logs/demo_seeds/seed_N.log. Record results in benchmarks/RESULTS.md with the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHON
SEEDS=("$@")
[ "${#SEEDS[@]}" -gt 0 ] || SEEDS=(0 1 2)
mkdir -p logs/demo_seeds
SUMMARY=()
for SEED in "${SEEDS[@]}"; do
  if [ "$SEED" = 0 ]; then DATA=data; DEMO=logs/toy_world_demo; else DATA="data/seed_$SEED"; DEMO="logs/toy_world_demo/seed_$SEED"; fi
  if [ -z "${KEEP:-}" ]; then rm -rf "$DATA/toy_world" "$DEMO/global_model"; fi
  LOAD=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?")
  echo "== seed $SEED (load average $LOAD); log: logs/demo_seeds/seed_$SEED.log"
  START=$SECONDS
  SEED=$SEED bash train_reranking.sh > "logs/demo_seeds/seed_$SEED.log" 2>&1
  SECONDS_TAKEN=$((SECONDS - START))
  LINE=$("$PYTHON" - "$DEMO/latest/reranker/results.json" "$SEED" "$SECONDS_TAKEN" "$LOAD" <<'EOF'
import json
import sys

results, seed, seconds, load = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]
before, after, margins = results["test_before_training"], results["test"], results["test_margins"]
over_global, over_untrained = margins["reranked_minus_global_R@1"], margins["trained_minus_untrained_reranker_R@1"]
print(
    f"seed {seed}: {seconds} s (load {load}); test R@1 global {after['global']['R@1']:.2f}, reranked untrained "
    f"{before['reranked']['R@1']:.2f} -> trained {after['reranked']['R@1']:.2f}; trained - global "
    f"{over_global['points']:+.2f} [{over_global['ci95'][0]:+.2f}, {over_global['ci95'][1]:+.2f}], "
    f"trained - untrained {over_untrained['points']:+.2f} [{over_untrained['ci95'][0]:+.2f}, "
    f"{over_untrained['ci95'][1]:+.2f}]"
)
EOF
  )
  echo "$LINE"
  SUMMARY+=("$LINE")
done
echo "== summary ($(nproc) CPUs, $("$PYTHON" -c 'import torch; print("torch", torch.__version__)'))"
printf '%s\n' "${SUMMARY[@]}"
