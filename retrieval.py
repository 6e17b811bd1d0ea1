"""Global retrieval with faiss (exact L2), recall@N, and the optional fusion of reranker and global scores."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import faiss
import numpy as np
import torch

logger = logging.getLogger(__name__)


def faiss_uses_gpu(device: torch.device) -> bool:
    """True when faiss was built with GPU support and the run is on CUDA."""
    return device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def exact_knn(
    database: np.ndarray, queries: np.ndarray, k: int, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 nearest neighbours: database (Nd, D), queries (Nq, D) -> (squared distances, indices), (Nq, k).

    k must not exceed Nd (faiss would pad with -1). Runs on the GPU when faiss-gpu is installed and device is cuda.
    """
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not 0 < k <= len(database):
        raise ValueError(f"k must be in [1, {len(database)}] (the database size), got {k}")
    index = faiss.IndexFlatL2(database.shape[1])
    if device is not None and faiss_uses_gpu(device):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device.index or 0, index)
    index.add(database)
    distances, predictions = index.search(queries, k)
    if (predictions < 0).any():  # cannot happen with k <= Nd; checked because a -1 would index the last image
        raise RuntimeError("faiss returned -1 indices")
    return distances, predictions.astype(np.int64)


def clamp_top_k(requested: int, database_num: int, what: str = "--rerank_top") -> int:
    """min(requested, database_num), with a warning when it clamps."""
    if requested > database_num:
        logger.warning(
            "%s %d is larger than the database (%d images): using %d", what, requested, database_num, database_num
        )
        return database_num
    return requested


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
    return 100.0 * differences.mean(), 100.0 * lower, 100.0 * upper


def fused_scores(probabilities: np.ndarray, squared_distances: np.ndarray, weight: float) -> np.ndarray:
    """(1 - w) * P(same place) + w * (1 + cos) / 2, with cos = 1 - d^2 / 2 for unit descriptors; w = 0 -> P."""
    if weight == 0.0:
        return probabilities
    cosine = 1.0 - squared_distances / 2.0
    return (1.0 - weight) * probabilities + weight * (1.0 + cosine) / 2.0
