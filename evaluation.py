"""Evaluation of one split, as its four stages: extract (extraction.py) -> search (retrieval.py) -> rerank
(reranking.py) -> score (metrics.py). outputs.py turns the result into files.

``evaluate`` is what test.py runs and what training validates with. Under torchrun the ranks share the extraction
(each its whole batches of the database and of the queries, into a store of its own) and the reranking (each its
whole batches of queries); rank 0 searches; every rank ends with the same Evaluation, equal to a one-process run's
(docs/distributed.md).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from config import EvalSettings
from extraction import extract_features
from metrics import rank_counts, recall_at_n
from model.network import PRGSNetwork
from places.index import DatasetError, PlaceIndex
from reranking import rerank_shared
from retrieval import ShortlistSource, candidates_retrieval, clamp_top_k, global_retrieval


@dataclass
class Evaluation:
    """Everything one evaluation produced. Predictions are database indices, (Nq, K) with K >= rerank_top."""

    global_predictions: np.ndarray
    global_distances: np.ndarray
    reranked_predictions: np.ndarray
    rerank_scores: np.ndarray  # (Nq, rerank_top) final score of each reranked candidate, in order
    rerank_top: int
    global_recalls: dict[int, float] | None  # percent; None without ground truth (MSLS test)
    reranked_recalls: dict[int, float] | None
    timings: dict[str, float]
    store_bytes_per_image: int
    store_tier: str | None = None  # where the local features were held: device, host or disk
    retrieval: dict = field(default_factory=dict)  # the index searched; with --faiss_index, exact search beside it
    ranks: dict = field(default_factory=dict)  # world_size, images_per_rank (extracted), queries_per_rank (reranked)
    resolved: dict = field(default_factory=dict)  # what ran where a flag said "auto" (EvalSettings.resolved)


def evaluate(
    model: PRGSNetwork,
    index: PlaceIndex,
    settings: EvalSettings,
    work_folder: Path,
    with_rerank: bool = True,
    source: ShortlistSource | None = None,
) -> Evaluation:
    """Extract, search, rerank and score one split. The local-feature store (in work_folder/local_features for the
    disk tier) is dropped at the end, however the evaluation ends (an error, Ctrl-C, a full disk).
    with_rerank=False skips the reranking (reranked = global order). ``source``: where the shortlist comes from
    (default PRGS's own global descriptors; another global model's, or a file of candidates); its record goes into
    the retrieval report. With several ranks each reranks its whole batches of queries and every rank returns the
    whole Evaluation."""
    source = source or ShortlistSource()
    if index.queries_num == 0 or index.database_num == 0:
        raise DatasetError(f"{index.summary()} has no queries or no database images: there is nothing to evaluate")
    store_folder = work_folder / "local_features"
    store = None
    top = clamp_top_k(settings.rerank_top, index.database_num)
    from_file = _read_candidates(source, index, top)  # a file that does not fit is refused before any extraction
    try:
        start = time.perf_counter()
        descriptors, store, timings = extract_features(
            model, index, settings, store_folder if with_rerank else None, source.retriever
        )
        timings["extraction_seconds"] = time.perf_counter() - start
        search = _search(descriptors, index.database_num, top, settings, timings, from_file)
        search.report["shortlist"] = source.record()
        if with_rerank:
            reranked, scores = _rerank(
                model, store, search, index.database_num, replace(settings, rerank_top=top), timings
            )
        else:
            reranked = search.predictions
            scores = np.full((len(search.predictions), top), np.nan, dtype=np.float32)
    finally:
        if store is not None:
            store.close()
        shutil.rmtree(store_folder, ignore_errors=True)  # also a store left half-written by a failed extraction
    global_recalls, reranked_recalls = _score(index, search, reranked, settings)
    return Evaluation(
        global_predictions=search.predictions,
        global_distances=search.distances,
        reranked_predictions=reranked,
        rerank_scores=scores,
        rerank_top=top,
        global_recalls=global_recalls,
        reranked_recalls=reranked_recalls,
        timings=timings,
        store_bytes_per_image=store.bytes_per_image if store is not None else 0,
        store_tier=store.tier if store is not None else None,
        retrieval=search.report,
        ranks=rank_counts(index, settings, with_rerank),
        resolved=settings.resolved(),
    )


@dataclass
class _Search:
    """Global retrieval's result: (Nq, K) squared distances and database indices; exact search's predictions beside
    an approximate index's (else None); the report of the index searched."""

    distances: np.ndarray
    predictions: np.ndarray
    exact_predictions: np.ndarray | None
    report: dict


def _read_candidates(source: ShortlistSource, index: PlaceIndex, top: int) -> _Search | None:
    """The shortlists of source's candidates file (each at least ``top`` long), or None without one."""
    if source.candidates is None:
        return None
    return _Search(*candidates_retrieval(source.candidates, index, top))


def _search(
    descriptors: np.ndarray,
    database_num: int,
    top: int,
    settings: EvalSettings,
    timings: dict[str, float],
    from_file: _Search | None = None,
) -> _Search:
    """Global retrieval of the queries' descriptors among the database's (descriptors (N, D), database first), for
    enough columns to rerank ``top`` and to count every recall@N, unless the shortlists came ``from_file``; its
    times go into ``timings``."""
    start = time.perf_counter()
    if from_file is not None:
        search = from_file  # read before the extraction: its reading time is ms_per_query's
        timings["retrieval_seconds"] = search.report["ms_per_query"] * len(search.predictions) / 1000
    else:
        num_columns = clamp_top_k(max(top, max(settings.recall_values)), database_num, "recall@N")
        database, queries = descriptors[:database_num], descriptors[database_num:]
        search = _Search(*global_retrieval(database, queries, num_columns, settings))
        timings["retrieval_seconds"] = time.perf_counter() - start
    timings["retrieval_ms_per_query"] = search.report["ms_per_query"]
    return search


def _rerank(
    model: PRGSNetwork, store, search: _Search, database_num: int, settings: EvalSettings, timings: dict[str, float]
) -> tuple[np.ndarray, np.ndarray]:
    """The reranked predictions (Nq, K) and the final scores (Nq, settings.rerank_top) of the global shortlist;
    its times go into ``timings``."""
    start = time.perf_counter()
    reranked, scores, rerank_timings = rerank_shared(
        model, store, search.predictions, search.distances, database_num, settings
    )
    timings.update(rerank_timings, rerank_seconds=time.perf_counter() - start)
    return reranked, scores


def _score(
    index: PlaceIndex, search: _Search, reranked: np.ndarray, settings: EvalSettings
) -> tuple[dict[int, float] | None, dict[int, float] | None]:
    """Recall@N (percent) of the global and of the reranked order, None each without ground truth; with an
    approximate index also exact search's, added to the search report."""
    positives = index.soft_positives_per_query
    if positives is None:
        return None, None
    if search.exact_predictions is not None:
        search.report["exact_recalls"] = recall_at_n(search.exact_predictions, positives, settings.recall_values)
    global_recalls = recall_at_n(search.predictions, positives, settings.recall_values)
    return global_recalls, recall_at_n(reranked, positives, settings.recall_values)
