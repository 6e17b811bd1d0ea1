#!/usr/bin/env bash
# Evaluate PRGS (see `python3 test.py --help` for every flag).
#
# Without arguments: the built-in toy world, generated under ./data on first use, with the toy preset.
# Add --resume CHECKPOINT to evaluate a trained model, e.g. the one `bash train_reranking.sh` leaves in logs/.
#
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
exec "$PYTHON" -u test.py "$@"
