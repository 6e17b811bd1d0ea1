#!/usr/bin/env bash
# The GPU session that measures the reranker kernels and a fast evaluation (one H100 or H200, 16 CPU cores), about 5.5 minutes end to end, from the repository root:
#   OUT=folder GOLDEN=path/to/golden bash benchmarks/gpu_rerank_kernels.sh
# Needs: torch with CUDA, triton, torchvision, timm, faiss (pip install a faiss-cpu wheel first), and the
# trained toy checkpoint .device/toy_reranker.pth (copy the ignored .device/ folder along). Every step runs under a deadline and a timeout;
# one that fails leaves its error in its log and the next step runs. Writes 8 files to OUT:
#   env.txt            GPU, driver, versions
#   synth.log          the MSLS-val-sized split: generation time (cached in $SYNTH between runs)
#   toy_accuracy.json  every fast setting against the reference-like one on the trained toy model (+ .log)
#   reranker.json      kernels x 1, 4, 8 queries per call: ms/query, peak memory; golden accuracy (+ .log)
#   e2e.json           test.py on the synthetic split: reference-like and fast settings, per stage (+ .log)
# SMOKE=1 runs the same steps on a CPU at tiny sizes (checks the script; its figures mean nothing).
set -uo pipefail
OUT="${OUT:-gpu_out}"; GOLDEN="${GOLDEN:-../shared/reference/golden}"; PYTHON="${PYTHON:-python3}"
CHECKPOINT="${CHECKPOINT:-.device/toy_reranker.pth}"; SYNTH="${SYNTH:-/tmp/prgs_msls_synth}"; TOY="${TOY:-/tmp/prgs_data}"
SMOKE="${SMOKE:-0}"; SCALE=1; SMOKE_FLAG=(); SYNTH_SIZE=(); DEVICE=cuda
if [ "$SMOKE" = 1 ]; then
  SCALE=8; SMOKE_FLAG=(--smoke); SYNTH_SIZE=(--database_num 12 --queries_num 2); DEVICE=cpu; export TRITON_INTERPRET=1
fi
START=$(date +%s)
mkdir -p "$OUT"
left() { local s=$(( START + SCALE * $1 - $(date +%s) )); echo $(( s > 1 ? s : 1 )); }  # seconds to START + $1
at() { echo $(( START + SCALE * $1 )); }

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PYTHON" -c "import torch, torchvision, timm, triton; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  "$PYTHON" -c "import faiss; print('faiss', faiss.__version__)" || echo "faiss missing: the end-to-end runs (test.py) will fail"
  nproc; free -g | head -2; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$SMOKE" = 1 ]; then "$PYTHON" -m places.toy_world --datasets_folder "$TOY" --preset small > /dev/null; fi
echo "== 1/4 synthetic split (14 processes, background) and the trained toy model's accuracy (GPU)"
"$PYTHON" benchmarks/msls_synth.py --folder "$SYNTH" --workers 14 "${SYNTH_SIZE[@]}" > "$OUT/synth.log" 2>&1 &
SYNTH_PID=$!
timeout "$(left 105)" "$PYTHON" -u benchmarks/bench_toy_accuracy.py --checkpoint "$CHECKPOINT" --datasets_folder "$TOY" \
  --out "$OUT/toy_accuracy.json" --num_workers 2 --deadline "$(at 85)" "${SMOKE_FLAG[@]}" > "$OUT/toy_accuracy.log" 2>&1 \
  || echo "toy accuracy stopped early (see toy_accuracy.log)"
wait "$SYNTH_PID" || echo "synthetic split failed (see synth.log)"
cat "$OUT/synth.log"

echo "== 2/4 reranker kernels (alone on the machine)"
timeout "$(left 205)" "$PYTHON" -u benchmarks/bench_rerank_fast.py --golden_dir "$GOLDEN" --out "$OUT/reranker.json" \
  --deadline "$(at 185)" "${SMOKE_FLAG[@]}" > "$OUT/reranker.log" 2>&1 || echo "reranker benchmark stopped early (see reranker.log)"

read -r FAST_KERNEL FAST_PRECISION < <("$PYTHON" benchmarks/pick_fast.py "$OUT/toy_accuracy.json" "$OUT/reranker.json")
if [ "$SMOKE" = 1 ]; then FAST_KERNEL=stage0; FAST_PRECISION=fp32; fi  # no fused kernel at 1200 nodes on a CPU
echo "== 3/4 test.py end to end: fast settings = --rerank_kernel $FAST_KERNEL --precision $FAST_PRECISION"
timeout "$(left 345)" "$PYTHON" -u benchmarks/bench_e2e.py --datasets_folder "$SYNTH" --out "$OUT/e2e.json" \
  --settings fast_torchvision reference fast_pil --fast_kernel "$FAST_KERNEL" --fast_precision "$FAST_PRECISION" \
  --device "$DEVICE" --deadline "$(at 300)" --hard_stop "$(at 340)" > "$OUT/e2e.log" 2>&1 || echo "end-to-end runs stopped early (see e2e.log)"

echo "== 4/4 summary ($(( $(date +%s) - START )) s in all)"
grep -A 40 "^trained toy model" "$OUT/toy_accuracy.log" | head -16
grep -A 40 "^reranker, " "$OUT/reranker.log" | grep -v "^golden" | head -34
grep "^golden" "$OUT/reranker.log" | cut -c 1-150
grep -A 6 "^setting" "$OUT/e2e.log"
