"""Accuracy of the fast evaluation settings on a *trained* model (the toy-world demo's, whose scores are not
near-ties): every configuration is evaluated end to end (extraction, store, retrieval, reranking) on the toy world's
test, val and train splits and compared with the reference-like one (plain kernel, float32 extraction and store).

    python benchmarks/bench_toy_accuracy.py --checkpoint .device/toy_reranker.pth --datasets_folder /tmp/prgs_data \
        --out OUT/toy_accuracy.json

Per configuration: the share of queries whose reranked top-1 is unchanged, reranked recall@1/5/10 and their change,
the share of queries whose whole reranked top-K order is unchanged, and the largest score change. A fast setting may
become a CUDA default only with >= 99.5% top-1 unchanged and recall@1/5/10 within 0.1 (`meets_accuracy_bar`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import EvalSettings  # noqa: E402
from datasets_ws import SplitRequest, load_split  # noqa: E402
from evaluation import evaluate  # noqa: E402
from model.checkpoint import build_model  # noqa: E402
from model.network import ModelConfig  # noqa: E402

REFERENCE = ("reference: plain, fp32, float32 store", dict(rerank_kernel="plain", store_dtype="float32"))
CONFIGS = [  # most needed first: a deadline skips the last ones
    ("fused_tf32", dict(rerank_kernel="fused_tf32")),
    ("fused_bf16", dict(rerank_kernel="fused_bf16")),
    ("bf16 extraction + fused_tf32", dict(rerank_kernel="fused_tf32", precision="bf16")),
    ("bf16 extraction + fused_bf16", dict(rerank_kernel="fused_bf16", precision="bf16")),
    ("stage0", dict(rerank_kernel="stage0")),
    ("fused_tf32 + CUDA graphs", dict(rerank_kernel="fused_tf32", rerank_cuda_graphs=True)),
    ("bf16 + fused_tf32 + torchvision decoder", dict(rerank_kernel="fused_tf32", precision="bf16",
                                                     image_decoder="torchvision")),
    ("stage0, float32 store", dict(rerank_kernel="stage0", store_dtype="float32")),
    ("plain, float16 store (today's default)", dict(rerank_kernel="plain")),
    ("bf16 extraction + stage0 (bf16 autocast)", dict(rerank_kernel="stage0", precision="bf16",
                                                     reranking_precision="bf16")),
]  # fmt: skip
SMOKE_CONFIGS = [CONFIGS[0], CONFIGS[4], CONFIGS[6], CONFIGS[8]]


def compare(reference, evaluation, positives, top: int) -> dict:
    """Agreement of one evaluation with the reference evaluation of the same split."""
    same_top1 = evaluation.reranked_predictions[:, 0] == reference.reranked_predictions[:, 0]
    same_order = (evaluation.reranked_predictions[:, :top] == reference.reranked_predictions[:, :top]).all(1)
    return {
        "queries": len(same_top1),
        "top1_unchanged": int(same_top1.sum()),
        "top1_correctness_unchanged": int(
            (top1_correct(evaluation, positives) == top1_correct(reference, positives)).sum()
        ),
        "order_unchanged": int(same_order.sum()),
        "max_abs_score_diff": float(
            np.abs(np.sort(evaluation.rerank_scores, 1) - np.sort(reference.rerank_scores, 1)).max()
        ),
        "recalls": {f"R@{n}": evaluation.reranked_recalls[n] for n in (1, 5, 10)},
        "reference_recalls": {f"R@{n}": reference.reranked_recalls[n] for n in (1, 5, 10)},
    }


def top1_correct(evaluation, positives) -> np.ndarray:
    """(Nq,) bool: the reranked top-1 is a positive."""
    return np.array([p[0] in positives[q] for q, p in enumerate(evaluation.reranked_predictions)])


def score_gaps(evaluation) -> dict:
    """How close the reference's top two reranked scores are: near-ties swap under any rounding change."""
    gap = evaluation.rerank_scores[:, 0] - evaluation.rerank_scores[:, 1]
    return {"median_top1_top2_gap": float(np.median(gap)), "share_below_1e-3": float((gap < 1e-3).mean())}


def summarise(per_split: dict) -> dict:
    """Pooled over the splits: shares in percent, recalls weighted by queries, their largest change."""
    queries = sum(s["queries"] for s in per_split.values())
    counts = ("queries", "top1_unchanged", "top1_correctness_unchanged", "order_unchanged")
    pooled = {k: sum(s[k] for s in per_split.values()) for k in counts}
    recall = {
        n: sum(s["recalls"][n] * s["queries"] for s in per_split.values()) / queries for n in ("R@1", "R@5", "R@10")
    }
    reference = {
        n: sum(s["reference_recalls"][n] * s["queries"] for s in per_split.values()) / queries
        for n in ("R@1", "R@5", "R@10")
    }
    delta = {n: recall[n] - reference[n] for n in recall}
    return {
        **pooled,
        "top1_unchanged_pct": 100 * pooled["top1_unchanged"] / queries,
        "top1_correctness_unchanged_pct": 100 * pooled["top1_correctness_unchanged"] / queries,
        "order_unchanged_pct": 100 * pooled["order_unchanged"] / queries,
        "recalls": recall,
        "recall_change": delta,
        "max_abs_score_diff": max(s["max_abs_score_diff"] for s in per_split.values()),
        "meets_accuracy_bar": 100 * pooled["top1_unchanged"] / queries >= 99.5 and max(map(abs, delta.values())) <= 0.1,
    }


def run(model, splits: dict, base: EvalSettings, configs, work: Path, deadline: float, results: dict, write) -> None:
    references = {name: evaluate(model, index, _settings(base, REFERENCE[1]), work) for name, index in splits.items()}
    results["reference"] = {
        name: {**{f"R@{n}": e.reranked_recalls[n] for n in (1, 5, 10)}, **score_gaps(e)}
        for name, e in references.items()
    }
    for label, overrides in configs:
        if deadline and time.time() > deadline:
            results["configs"][label] = {"error": "deadline"}
            continue
        try:
            start = time.perf_counter()
            settings = _settings(base, overrides)
            per_split = {}
            for name, index in splits.items():
                evaluation = evaluate(model, index, settings, work)
                per_split[name] = compare(references[name], evaluation, index.soft_positives_per_query, base.rerank_top)
            results["configs"][label] = {"settings": overrides, **summarise(per_split), "per_split": per_split,
                                         "seconds": time.perf_counter() - start}  # fmt: skip
        except Exception as error:  # noqa: BLE001 - record and go on
            results["configs"][label] = {"settings": overrides, "error": f"{type(error).__name__}: {error}"[:500]}
        print(label, json.dumps({k: v for k, v in results["configs"][label].items() if k != "per_split"}), flush=True)
        write()


def _settings(base: EvalSettings, overrides: dict) -> EvalSettings:
    return EvalSettings(**{**base.__dict__, **overrides})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="the toy-world demo's trained reranker")
    parser.add_argument("--datasets_folder", type=Path, default=Path("/tmp/prgs_data"), help="toy world made here")
    parser.add_argument("--out", type=Path, required=True, help="JSON file, rewritten after every configuration")
    parser.add_argument("--num_workers", type=int, default=8, help="DataLoader workers")
    parser.add_argument("--deadline", type=float, default=0.0, help="unix time after which configurations are skipped")
    parser.add_argument("--smoke", action="store_true", help="CPU, the test split, top-5, four configurations only")
    args = parser.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    model, _ = build_model(ModelConfig(), resume=str(args.checkpoint))
    model = model.to(device).eval()
    names = ("test",) if args.smoke else ("test", "val", "train")
    splits = {name: load_split(SplitRequest(args.datasets_folder, "toy_world", name)) for name in names}
    top = 5 if args.smoke else 20
    base = EvalSettings(model.config.image_size, device, infer_batch_size=64, num_workers=args.num_workers,
                        rerank_top=top, rerank_batch_size=8, recall_values=[1, 5, 10, 20])  # fmt: skip
    results = {
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
        "checkpoint": str(args.checkpoint),
        "splits": {n: s.queries_num for n, s in splits.items()},
        "configs": {},
    }
    write = lambda: args.out.write_text(json.dumps(results, indent=2))  # noqa: E731
    configs = SMOKE_CONFIGS if args.smoke else CONFIGS
    run(model, splits, base, configs, Path("/tmp/prgs_toy_accuracy_work"), args.deadline, results, write)
    write()
    print_table(results)


def print_table(results: dict) -> None:
    print(f"\ntrained toy model, {sum(results['splits'].values())} queries, against {REFERENCE[0]}")
    print(f"reference's top-2 score gaps: {json.dumps(results['reference'])}")
    print(f"{'configuration':45s} {'top-1 same':>10s} {'order same':>10s} {'dR@1':>6s} {'dR@5':>6s} {'dR@10':>6s}")
    for label, row in results["configs"].items():
        if "error" in row:
            print(f"{label:45s} error: {row['error'][:70]}")
            continue
        change = row["recall_change"]
        verdict = "  meets the bar" if row["meets_accuracy_bar"] else ""
        print(
            f"{label:45s} {row['top1_unchanged_pct']:9.2f}% {row['order_unchanged_pct']:9.2f}% "
            f"{change['R@1']:6.2f} {change['R@5']:6.2f} {change['R@10']:6.2f}{verdict}"
        )


if __name__ == "__main__":
    main()
