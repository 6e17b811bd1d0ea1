"""What an evaluation measures: recall@N, the first correct rank, paired bootstrap intervals, the MSLS protocol's
mAP@k, how the ranks shared the work, and peak memory."""

from __future__ import annotations

import resource
from collections.abc import Sequence

import numpy as np
import torch

import distributed
from config import EvalSettings
from places.index import PlaceIndex
from places.msls_protocol import msls_map_at_k


def recall_at_n(
    predictions: np.ndarray, positives: Sequence[np.ndarray], recall_values: Sequence[int]
) -> dict[int, float]:
    """Percent of queries with a positive among the first N predictions, for each N (VG benchmark and MSLS
    definition). predictions (Nq, K); an N larger than K counts all K columns."""
    if len(predictions) != len(positives):
        raise ValueError(f"{len(predictions)} prediction rows for {len(positives)} queries")
    first_hit = first_correct_rank(predictions, positives)  # (Nq,) 0-based, K when none
    columns = predictions.shape[1]
    return {n: float(100.0 * np.mean(first_hit < min(n, columns))) if len(first_hit) else 0.0 for n in recall_values}


def first_correct_rank(predictions: np.ndarray, positives: Sequence[np.ndarray]) -> np.ndarray:
    """0-based rank of the first positive in each row of predictions (Nq, K), or K when there is none."""
    ranks = np.full(len(predictions), predictions.shape[1], dtype=np.int64)
    for query, (row, query_positives) in enumerate(zip(predictions, positives)):
        hits = np.flatnonzero(np.isin(row, query_positives))
        if len(hits):
            ranks[query] = hits[0]
    return ranks


def paired_bootstrap(
    hits_a: np.ndarray, hits_b: np.ndarray, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Difference of two recalls on the same queries with its bootstrap confidence interval, in points.

    hits_a, hits_b (Nq,) bool: per query, whether ranking a / b is correct (e.g. a positive at rank 1). Queries are
    resampled with replacement, the same ones for both rankings (a paired bootstrap), ``resamples`` times. Returns
    (100 * mean(a - b), lower, upper), the bounds being the (1 - level) / 2 and (1 + level) / 2 quantiles.
    """
    if hits_a.shape != hits_b.shape or hits_a.ndim != 1 or not len(hits_a):
        raise ValueError(f"need two equally long non-empty rows of hits, got {hits_a.shape} and {hits_b.shape}")
    differences = hits_a.astype(np.float64) - hits_b.astype(np.float64)  # (Nq,) in {-1, 0, 1}
    samples = np.random.default_rng(seed).integers(len(differences), size=(resamples, len(differences)))
    means = differences[samples].mean(axis=1)  # (resamples,)
    lower, upper = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(100.0 * differences.mean()), float(100.0 * lower), float(100.0 * upper)


def msls_map(
    rankings: dict[str, np.ndarray], positives: Sequence[np.ndarray], ks: Sequence[int]
) -> dict[str, dict[str, float]]:
    """The MSLS protocol's mAP@k (places.msls.msls_map_at_k) of each ranking (Nq, K) by its label:
    {label: {"mAP@k": percent, rounded to 4 decimals}}."""
    return {
        label: {f"mAP@{k}": round(v, 4) for k, v in msls_map_at_k(predictions, positives, ks).items()}
        for label, predictions in rankings.items()
    }


def rank_counts(index: PlaceIndex, settings: EvalSettings, with_rerank: bool) -> dict:
    """How the ranks shared an evaluation: world_size, images each extracted, queries each reranked."""
    database = distributed.shard_sizes(index.database_num, settings.infer_batch_size)
    queries = distributed.shard_sizes(index.queries_num, settings.infer_batch_size)
    reranked = distributed.shard_sizes(index.queries_num, settings.rerank_batch_size)
    return {
        "world_size": distributed.world_size(),
        "images_per_rank": [d + q for d, q in zip(database, queries)],
        "queries_per_rank": reranked if with_rerank else [0] * len(reranked),
    }


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """The process's peak resident host memory and, on CUDA, the peak of torch's GPU allocations, in MiB."""
    memory = {"peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        memory["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory
