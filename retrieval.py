"""Global retrieval with faiss (exact L2, or an approximate index from an index-factory string), on every visible GPU
with faiss-gpu, recall@N, and the optional fusion of reranker and global scores."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import faiss
import numpy as np
import torch

from util import PRGSError

logger = logging.getLogger(__name__)


class RetrievalError(PRGSError, ValueError):
    """A --faiss_index that faiss cannot build, train or search as asked."""


def faiss_uses_gpu(device: torch.device | None) -> bool:
    """True when faiss was built with GPU support and the run is on CUDA."""
    return (
        device is not None
        and device.type == "cuda"
        and hasattr(faiss, "StandardGpuResources")
        and faiss.get_num_gpus() > 0
    )


def on_gpus(index: faiss.Index, device: torch.device | None) -> faiss.Index:
    """With faiss-gpu on a CUDA run: ``index`` copied to the visible GPUs, its rows split among them (one GPU: the
    whole index there); otherwise, or when faiss-gpu cannot hold this kind of index, ``index`` itself."""
    if not faiss_uses_gpu(device):
        return index
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True  # each GPU holds a part of the database; searches are merged
    try:
        return faiss.index_cpu_to_all_gpus(index, co=options)
    except RuntimeError as error:
        logger.warning("faiss-gpu cannot hold %s (%s); searching on the CPU", type(index).__name__, error)
        return index


def exact_knn(
    database: np.ndarray, queries: np.ndarray, k: int, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 nearest neighbours: database (Nd, D), queries (Nq, D) -> (squared distances, indices), (Nq, k).

    k must not exceed Nd (faiss would pad with -1). Runs on the visible GPUs when faiss-gpu is installed and device
    is cuda.
    """
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not 0 < k <= len(database):
        raise ValueError(f"k must be in [1, {len(database)}] (the database size), got {k}")
    index = on_gpus(faiss.IndexFlatL2(database.shape[1]), device)
    index.add(database)
    distances, predictions = index.search(queries, k)
    if (predictions < 0).any():  # cannot happen with k <= Nd; checked because a -1 would index the last image
        raise RuntimeError("faiss returned -1 indices")
    return distances, predictions.astype(np.int64)


def approximate_knn(
    database: np.ndarray,
    queries: np.ndarray,
    k: int,
    factory: str,
    nprobe: int,
    train_size: int,
    device: torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Search with the faiss index-factory string ``factory`` (e.g. 'IVF4096,PQ32'): build_index, then
    search_index. database (Nd, D), queries (Nq, D) -> (squared distances as the index computes them, approximate
    for compressed codes; indices), (Nq, k); and seconds to train and to add, milliseconds per query to search."""
    index, timings = build_index(database, factory, train_size, device)
    distances, predictions, timings["ms_per_query"] = search_index(index, queries, k, factory, nprobe)
    return distances, predictions, timings


def build_index(
    database: np.ndarray, factory: str, train_size: int, device: torch.device | None = None
) -> tuple[faiss.Index, dict[str, float]]:
    """The index ``factory`` describes, trained on ``train_size`` database rows drawn at random (fixed seed) and
    holding every row (Nd, D), on the visible GPUs with faiss-gpu; and the seconds it took to train and to add."""
    database = np.ascontiguousarray(database, dtype=np.float32)
    try:
        index = faiss.index_factory(database.shape[1], factory)
    except RuntimeError as error:
        raise RetrievalError(
            f"--faiss_index {factory!r} is not a faiss index-factory string ({_last_line(error)})"
        ) from error
    _plain_training(index)
    rng = np.random.default_rng(0)
    sample = database[np.sort(rng.choice(len(database), min(train_size, len(database)), replace=False))]
    start = time.perf_counter()
    try:
        index.train(sample)
    except RuntimeError as error:
        raise RetrievalError(
            f"--faiss_index {factory!r} cannot be trained on {len(sample)} database descriptors "
            f"({_last_line(error)}): use fewer inverted lists (IVFn) or PQ codes of fewer bits (PQmx4), or a "
            "larger --faiss_train_size"
        ) from error
    timings = {"train_seconds": time.perf_counter() - start}
    start = time.perf_counter()
    index.add(database)
    timings["add_seconds"] = time.perf_counter() - start
    return on_gpus(index, device), timings


def search_index(
    index: faiss.Index, queries: np.ndarray, k: int, factory: str, nprobe: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """(distances, indices) (Nq, k) of queries (Nq, D) in a built index, visiting ``nprobe`` inverted lists (IVF
    indexes), and the milliseconds per query; RetrievalError when some query gets fewer than k results."""
    if "IVF" in factory:
        space = faiss.GpuParameterSpace() if hasattr(faiss, "GpuParameterSpace") else faiss.ParameterSpace()
        space.set_index_parameter(index, "nprobe", nprobe)
    start = time.perf_counter()
    distances, predictions = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    ms_per_query = 1000 * (time.perf_counter() - start) / max(1, len(queries))
    short = int((predictions < 0).any(axis=1).sum())
    if short:
        raise RetrievalError(
            f"--faiss_index {factory!r} with --faiss_nprobe {nprobe} found fewer than {k} candidates for {short} of "
            f"{len(queries)} queries: raise --faiss_nprobe or use fewer inverted lists"
        )
    return distances, predictions.astype(np.int64), ms_per_query


def _plain_training(index: faiss.Index) -> None:
    """Leave out of training what plain search does not use (IVF-PQ's polysemous code ordering, which is slow),
    and faiss's warning for each k-means run with few points per centroid (one per PQ sub-quantizer)."""
    ivf = faiss.try_extract_index_ivf(index)
    concrete = faiss.downcast_index(ivf if ivf is not None else index)
    if hasattr(concrete, "do_polysemous_training"):
        concrete.do_polysemous_training = False
    for part in (concrete, getattr(concrete, "pq", None)):
        if part is not None and hasattr(part, "cp"):
            part.cp.min_points_per_centroid = 1


def _last_line(error: Exception) -> str:
    """faiss's C++ message without the source location and failed check it starts with."""
    message = str(error).strip().splitlines()[-1] if str(error).strip() else repr(error)
    if "Error: " in message:
        return message.split("Error: ", 1)[1].split("failed: ", 1)[-1]
    return message.split(": ", 1)[-1]


@contextmanager
def all_cores_for_faiss() -> Iterator[None]:
    """faiss on every core this process may use, for a search that one process runs while the others wait (torchrun
    gives each process OMP_NUM_THREADS=1); the previous thread count afterwards."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(len(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


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
    return float(100.0 * differences.mean()), float(100.0 * lower), float(100.0 * upper)


def fused_scores(probabilities: np.ndarray, squared_distances: np.ndarray, weight: float) -> np.ndarray:
    """(1 - w) * P(same place) + w * (1 + cos) / 2, with cos = 1 - d^2 / 2 for unit descriptors; w = 0 -> P."""
    if weight == 0.0:
        return probabilities
    cosine = 1.0 - squared_distances / 2.0
    return (1.0 - weight) * probabilities + weight * (1.0 + cosine) / 2.0
