"""Pick the fast settings for the end-to-end run from the two earlier results of gpu_rerank_kernels.sh: the fastest
reranker kernel (at 8 queries per call with CUDA graphs, as test.py runs it) among those that meet the accuracy bar
on the trained toy model (>= 99.5% top-1 unchanged, recall@1/5/10 within 0.1), and bf16 extraction if it meets the
bar with that kernel. Prints "KERNEL PRECISION"; "stage0 fp32" when nothing can be read.

    python benchmarks/pick_fast.py OUT/toy_accuracy.json OUT/reranker.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def meets(accuracy: dict, label: str) -> bool:
    return bool(accuracy.get("configs", {}).get(label, {}).get("meets_accuracy_bar"))


def speed(reranker: dict, kernel: str) -> float:
    """ms/query of ``kernel`` at 8 queries per call (with CUDA graphs when measured), inf when missing."""
    times = [
        row["ms_per_query"]
        for row in reranker.get("rows", [])
        if row.get("kernel") == kernel and row.get("queries_per_call") == 8 and "ms_per_query" in row
    ]
    return min(times, default=float("inf"))


def main() -> None:
    try:
        accuracy = json.loads(Path(sys.argv[1]).read_text())
        reranker = json.loads(Path(sys.argv[2]).read_text())
    except (OSError, ValueError, IndexError):
        print("stage0 fp32")
        return
    candidates = [k for k in ("fused_tf32", "fused_bf16") if meets(accuracy, k)] or ["stage0"]
    kernel = min(candidates, key=lambda k: speed(reranker, k))
    bf16_label = "bf16 extraction + stage0 (bf16 autocast)" if kernel == "stage0" else f"bf16 extraction + {kernel}"
    precision = "bf16" if meets(accuracy, bf16_label) else "fp32"
    print(kernel, precision)


if __name__ == "__main__":
    main()
