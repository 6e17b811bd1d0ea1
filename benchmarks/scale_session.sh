#!/usr/bin/env bash
# Scale-out benchmark on a CUDA machine, from the repository root (benchmarks/bench_scale.py has the details):
#   OUT=folder bash benchmarks/scale_session.sh [bench_scale.py flags, e.g. --parts gpu]
# Writes OUT/bench_scale.json, OUT/test/ and OUT/train/ (the torchrun runs' outputs) and prints a table last.
set -euo pipefail
OUT="${OUT:-scale_out}"; PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import torch, timm, faiss; print('torch', torch.__version__, 'timm', timm.__version__, 'faiss', \
faiss.__version__, 'faiss-gpu', hasattr(faiss, 'StandardGpuResources'))"
"$PYTHON" -u benchmarks/bench_scale.py --out "$OUT" "$@"
