#!/usr/bin/env bash
# One GPU session: benchmarks + device checks (run from the repository root on a CUDA machine).
#   GOLDEN=path/to/golden OUT=folder bash benchmarks/gpu_session.sh
# Writes OUT/bench_gpu.json, OUT/toy_test.json (test.py on the toy world on CUDA) and OUT/toy_train.txt (a short
# bf16 training run on CUDA).
set -euo pipefail
OUT="${OUT:-gpu_out}"; GOLDEN="${GOLDEN:-../shared/reference/golden}"; PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, timm, faiss; print('torch', torch.__version__, 'timm', timm.__version__, 'faiss', faiss.__version__)"
"$PYTHON" -u benchmarks/bench_gpu.py --golden_dir "$GOLDEN" --out "$OUT/bench_gpu.json"
"$PYTHON" -u -m places.toy_world --datasets_folder /tmp/prgs_data > /dev/null
"$PYTHON" -u test.py --datasets_folder /tmp/prgs_data --device cuda --num_workers 4 --output_folder /tmp/prgs_toy \
  > /tmp/prgs_toy.log 2>&1 || { tail -30 /tmp/prgs_toy.log; exit 1; }
tail -4 /tmp/prgs_toy.log
cp /tmp/prgs_toy/results.json "$OUT/toy_test.json"
"$PYTHON" -u train_reranking.py --datasets_folder /tmp/prgs_data --device cuda --precision bf16 --num_workers 4 \
  --train_stage full --backbone_weights none --epochs_num 1 --queries_per_epoch 240 --cache_refresh_rate 240 \
  --negs_num_per_query 4 --max_steps 20 --output_folder /tmp/prgs_train > /tmp/prgs_train.log 2>&1 \
  || { tail -30 /tmp/prgs_train.log; exit 1; }
grep -E "step 1:|step 2:|trainable" /tmp/prgs_train.log | cut -c 1-160
"$PYTHON" -c "import torch; s=torch.load('/tmp/prgs_train/last.pth', weights_only=True); print('train on cuda bf16: global_step', s['training_state']['state']['global_step'])" | tee "$OUT/toy_train.txt"
