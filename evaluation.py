"""Evaluation of one split: extract -> local-feature store -> global retrieval -> rerank -> recall@N -> outputs.

``evaluate`` is what test.py runs and what training validates with. The outputs (results.json, predictions.csv)
are described in docs/outputs.md. Under torchrun the ranks share the extraction (each its whole batches of the
database and of the queries, into a store of its own) and the reranking (each its whole batches of queries); rank 0
searches; every rank ends with the same Evaluation, equal to a one-process run's (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import platform
import resource
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from tqdm import tqdm

import distributed
import runs
import util
from extraction import image_batches
from feature_store import (
    REFERENCE_BYTES_PER_IMAGE,
    LocalFeatureStore,
    MemoryFeatureStore,
    ShardedStore,
    StoreLayout,
    choose_tier,
    create_store,
)
from model.backbone import patch_grid
from model.correspondences import cross_graph_attention, stage_node_boxes
from model.network import PRGSNetwork
from model.reranker import RerankKernel, match_probability, rerank_kernel, stage_grids
from places.images import image_tensor, open_rgb_image
from places.index import DatasetError, PlaceIndex
from places.msls_protocol import msls_map_at_k, write_msls_submission, zip_msls_submission
from retrieval import (
    all_cores_for_faiss,
    approximate_knn,
    clamp_top_k,
    exact_knn,
    faiss_uses_gpu,
    first_correct_rank,
    fused_scores,
    recall_at_n,
)
from visualize import RerankedCandidate, save_prediction_picture, save_rerank_picture

logger = logging.getLogger(__name__)

# What "auto" picks per device type (docs/reranker_speed.md). One-line switches, flipped only on GPU measurements.
AUTO_RERANK_KERNEL = {"cpu": "stage0", "cuda": "plain"}
AUTO_IMAGE_DECODER = {"cpu": "pil", "cuda": "pil"}


@dataclass
class EvalSettings:
    image_size: tuple[int, int]
    device: torch.device
    precision: str = "fp32"
    infer_batch_size: int = 32
    num_workers: int = 2
    rerank_top: int = 100
    rerank_batch_size: int = 2
    rerank_fusion: float = 0.0
    recall_values: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 100])
    preprocessing: str = "pil"  # or "reference": the reference's test-time function (places.images.load_image)
    rerank_kernel: str = "plain"  # a name of model.reranker.RERANK_KERNELS
    rerank_cuda_graphs: bool = False  # replay the reranker as a CUDA graph per batch shape (CUDA only)
    store_tier: str = "auto"  # feature_store.TIERS or "auto"
    store_dtype: str = "float16"
    image_decoder: str = "pil"  # places.images.IMAGE_DECODERS
    faiss_index: str | None = None  # index-factory string for approximate search; None: exact
    faiss_nprobe: int = 32
    faiss_train_size: int = 100_000


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


# ----------------------------------------------------------------------------------------------------------------
# Extraction


def extract_features(
    model: PRGSNetwork, index: PlaceIndex, settings: EvalSettings, store_folder: Path | None
) -> tuple[np.ndarray, LocalFeatureStore | MemoryFeatureStore | ShardedStore | None, dict[str, float]]:
    """Global descriptors (N, D) in RAM and local features in a store (feature_store.py), database first, then
    queries.

    Returns (descriptors, the store ready for reading, timings): per database / queries, extraction_ms_per_image
    (everything), load_ms_per_image (waiting for decoded images on the device), forward_ms_per_image (network
    only) and store_write_ms_per_image (the stage-0 self graph when the kernel precomputes it, and the write), of
    this rank's images. With store_folder None only global descriptors are computed (global-only forward) and no
    store is returned. With several ranks each extracts its whole batches (shard_layout) into its own disk store,
    store_folder/rank_<r>, every rank receives all descriptors, and the store returned reads every rank's part.
    """
    kernel, world, store = rerank_kernel(settings.rerank_kernel), distributed.world_size(), None
    holder, rows = shard_layout(index.database_num, index.queries_num, settings.infer_batch_size, world)
    mine = holder == distributed.rank()
    if store_folder is not None:
        store = _rank_store(model, int(mine.sum()), settings, kernel, store_folder)
    descriptors = np.empty((len(index), model.config.fc_output_dim), dtype=np.float32)
    grid = patch_grid(settings.image_size)
    timings = {}
    for part, image_ids in (
        ("database", np.arange(index.database_num)),
        ("queries", np.arange(index.database_num, len(index))),
    ):
        own = image_ids[mine[image_ids]]
        forward, load, write = (util.Stopwatch(settings.device) for _ in range(3))
        start = time.perf_counter()
        with distributed.stop_together(f"extracting {part}"):
            for ids, output in image_batches(
                model,
                lambda images: model(images, global_only=store is None),
                index,
                own,
                settings.image_size,
                settings.device,
                settings.infer_batch_size,
                settings.num_workers,
                settings.precision,
                f"extracting {part}",
                forward,
                load,
                settings.image_decoder,
                settings.preprocessing,
            ):
                descriptors[ids] = (output if store is None else output[0]).float().cpu().numpy()
                if store is not None:
                    with write, torch.inference_mode():
                        stage0 = model.stage0_nodes(output[1], grid, kernel) if kernel.precomputed_stage0 else None
                        _write_to_store(store, rows[ids], output[1], stage0)
        count = max(1, len(own))
        for name, seconds in (("extraction", time.perf_counter() - start), ("load", load.seconds),
                              ("forward", forward.seconds), ("store_write", write.seconds)):  # fmt: skip
            timings[f"{name}_ms_per_image_{part}"] = 1000 * seconds / count
        if world > 1:
            descriptors[image_ids] = distributed.gather_rows(descriptors[own])
    return descriptors, _finished_store(store, store_folder, holder, rows), timings


def _rank_store(
    model: PRGSNetwork, num_images: int, settings: EvalSettings, kernel: RerankKernel, store_folder: Path
) -> LocalFeatureStore | MemoryFeatureStore:
    """This process's empty store for its num_images: in store_folder, in any tier; with several ranks a disk store
    in store_folder/rank_<r>, since every rank reads every rank's rows (files on the run folder's filesystem)."""
    if distributed.world_size() == 1:
        return _new_store(model, num_images, settings, kernel, store_folder)
    folder = store_folder / f"rank_{distributed.rank()}"
    return _new_store(model, num_images, _with(settings, store_tier="disk"), kernel, folder)


def _finished_store(store, store_folder: Path | None, holder: np.ndarray, rows: np.ndarray):
    """The store ready for reading: this process's own, or, with several ranks, every rank's part read as one."""
    if store is None:
        return None
    with distributed.stop_together("writing the local-feature store"):
        store = store.finish()
    if distributed.world_size() == 1:
        return store
    store.close()
    return ShardedStore.open(store_folder, holder, rows)


def _new_store(
    model: PRGSNetwork, num_images: int, settings: EvalSettings, kernel: RerankKernel, folder: Path
) -> LocalFeatureStore | MemoryFeatureStore:
    """An empty store for ``num_images`` in the tier ``settings.store_tier`` (auto: feature_store.choose_tier)."""
    layout = StoreLayout(
        patch_grid(settings.image_size),
        settings.image_size,
        model.backbone.patch_size,
        model.config.num_kept_nodes,
        model.config.local_dim,
        content="stage0" if kernel.precomputed_stage0 else "nodes",
        feature_dtype=settings.store_dtype,
    )
    tier, why = choose_tier(settings.store_tier, num_images, layout, settings.device)
    logger.info(
        "local-feature store: %s tier (%s), %s %s rows, %d B per image",
        tier,
        why,
        layout.content,
        layout.feature_dtype,
        layout.bytes_per_image,
    )
    return create_store(folder, num_images, layout, tier, settings.device)


def _write_to_store(
    store: LocalFeatureStore | MemoryFeatureStore, ids: np.ndarray, nodes: torch.Tensor, stage0: torch.Tensor | None
) -> None:
    """store.write, with a failed write of the disk tier (a full disk) reported as an OutputWriteError naming it."""
    try:
        store.write(ids, nodes, stage0)
    except OSError as error:
        raise util.OutputWriteError(
            f"cannot write the local-feature store {store.folder}: {util.describe_write_error(error, store.folder)}"
        ) from error


def shard_layout(database_num: int, queries_num: int, batch_size: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Who extracts and stores each image of a split when ``world`` ranks share it: (the rank (N,), the row in that
    rank's store (N,)). Rank r takes its whole batches of the database, then of the queries
    (distributed.shard_bounds), and stores them in that order. One rank: rank 0 and row = image index."""
    holder = np.empty(database_num + queries_num, dtype=np.int64)
    rows = np.empty(database_num + queries_num, dtype=np.int64)
    for number in range(world):
        database = np.arange(database_num)[distributed.shard_bounds(database_num, batch_size, number, world)]
        queries = (
            database_num + np.arange(queries_num)[distributed.shard_bounds(queries_num, batch_size, number, world)]
        )
        holder[database], rows[database] = number, np.arange(len(database))
        holder[queries], rows[queries] = number, len(database) + np.arange(len(queries))
    return holder, rows


# ----------------------------------------------------------------------------------------------------------------
# Reranking


def rerank(
    model: PRGSNetwork,
    store,
    predictions: np.ndarray,
    distances: np.ndarray,
    database_num: int,
    settings: EvalSettings,
    first_query: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Re-sort each query's first ``settings.rerank_top`` candidates by the reranker's probability (optionally fused
    with the global similarity).

    predictions / distances (Nq, K >= rerank_top) from global retrieval -> (reranked predictions (Nq, K) with the
    columns after rerank_top left in global order, final scores (Nq, rerank_top), timings). ``store`` is a store of
    feature_store.py (or anything with its ``content``, read_compact and expand): the next batch of queries is
    read in a background thread while this one runs, and rows are expanded to the reranker's input on the device.
    Row i of predictions is query ``first_query + i`` (a rank's part of the queries).
    """
    top, num_queries = settings.rerank_top, len(predictions)
    kernel = rerank_kernel(settings.rerank_kernel)
    if store.content != ("stage0" if kernel.precomputed_stage0 else "nodes"):
        raise ValueError(f"reranker kernel {kernel.name} cannot read a store of {store.content!r} rows")
    reranked = predictions.copy()
    scores = np.empty((num_queries, top), dtype=np.float32)
    batches = [
        np.arange(s, min(s + settings.rerank_batch_size, num_queries))
        for s in range(0, num_queries, settings.rerank_batch_size)
    ]
    score = _scorer(model, kernel, settings)

    def read_batch(queries: np.ndarray):
        """Compact rows of each query followed by its candidates (file reads only for the disk tier)."""
        query_images = database_num + first_query + queries
        group = np.concatenate([query_images[:, None], predictions[queries, :top]], axis=1)  # (b, 1+K)
        return store.read_compact(group.reshape(-1))

    forward, read_wait, expand = (util.Stopwatch(settings.device) for _ in range(3))
    start = time.perf_counter()
    model.eval()
    with ThreadPoolExecutor(max_workers=1) as reader, torch.inference_mode():
        pending = reader.submit(read_batch, batches[0]) if batches else None
        for number, queries in enumerate(tqdm(batches, desc="reranking", unit="batch", leave=False)):
            with read_wait:
                compact = pending.result()
            if number + 1 < len(batches):
                pending = reader.submit(read_batch, batches[number + 1])
            with expand:
                nodes = store.expand(*compact, device=settings.device)  # (b * (1+K), L, C)
                nodes = nodes.reshape(len(queries), 1 + top, *nodes.shape[1:])  # (b, 1+K, L, C), query first
            with forward:
                probabilities = score(nodes).float().cpu().numpy()  # (b, K)
            batch_scores = fused_scores(probabilities, distances[queries, :top], settings.rerank_fusion)
            _resort(queries, batch_scores, predictions, reranked, scores)
    per_query = 1000 / max(1, num_queries)
    seconds = {"": time.perf_counter() - start, "_forward": forward.seconds, "_read_wait": read_wait.seconds}
    seconds["_expand"] = expand.seconds
    return reranked, scores, {f"rerank{part}_ms_per_query": s * per_query for part, s in seconds.items()}


def _resort(
    queries: np.ndarray, batch_scores: np.ndarray, predictions: np.ndarray, reranked: np.ndarray, scores: np.ndarray
) -> None:
    """Order the first K candidates of ``queries`` by batch_scores (b, K), best first (a stable sort), writing the
    order into reranked (Nq, >= K) and the sorted scores into scores (Nq, K)."""
    top = batch_scores.shape[1]
    order = np.argsort(-batch_scores, axis=1, kind="stable")  # (b, K)
    reranked[queries, :top] = np.take_along_axis(predictions[queries, :top], order, axis=1)
    scores[queries] = np.take_along_axis(batch_scores, order, axis=1)


def _scorer(model: PRGSNetwork, kernel: RerankKernel, settings: EvalSettings):
    """nodes (b, 1+K, L, C) -> P(same place) (b, K): the reranker with ``kernel``, under the --precision autocast
    for the cdist kernels (the fused kernels fix their own precision), as a CUDA graph when asked."""
    grid = patch_grid(settings.image_size)
    precision = "fp32" if kernel.fused else settings.precision

    def score(nodes: torch.Tensor) -> torch.Tensor:
        with util.autocast(settings.device, precision):
            return match_probability(model.reranker(nodes, grid, kernel))

    if settings.rerank_cuda_graphs and settings.device.type == "cuda":
        return util.CudaGraphCache(score)
    return score


# ----------------------------------------------------------------------------------------------------------------
# Whole evaluation


def evaluate(
    model: PRGSNetwork, index: PlaceIndex, settings: EvalSettings, work_folder: Path, with_rerank: bool = True
) -> Evaluation:
    """Extract, retrieve, rerank and score one split. The local-feature store (in work_folder/local_features for
    the disk tier) is dropped at the end, however the evaluation ends (an error, Ctrl-C, a full disk).
    with_rerank=False skips the reranking (reranked = global order). With several ranks each reranks its whole
    batches of queries and every rank returns the whole Evaluation."""
    if index.queries_num == 0 or index.database_num == 0:
        raise DatasetError(f"{index.summary()} has no queries or no database images: there is nothing to evaluate")
    store_folder = work_folder / "local_features"
    store = None
    try:
        start = time.perf_counter()
        descriptors, store, timings = extract_features(model, index, settings, store_folder if with_rerank else None)
        timings["extraction_seconds"] = time.perf_counter() - start
        database, queries = descriptors[: index.database_num], descriptors[index.database_num :]
        top = clamp_top_k(settings.rerank_top, index.database_num)
        num_columns = clamp_top_k(max(top, max(settings.recall_values)), index.database_num, "recall@N")
        start = time.perf_counter()
        distances, predictions, exact_predictions, retrieval = global_retrieval(
            database, queries, num_columns, settings
        )
        timings["retrieval_seconds"] = time.perf_counter() - start
        timings["retrieval_ms_per_query"] = retrieval["ms_per_query"]
        if with_rerank:
            start = time.perf_counter()
            reranked, scores, rerank_timings = rerank_shared(
                model, store, predictions, distances, index.database_num, _with(settings, rerank_top=top)
            )
            timings.update(rerank_timings, rerank_seconds=time.perf_counter() - start)
        else:
            reranked, scores = predictions, np.full((len(predictions), top), np.nan, dtype=np.float32)
    finally:
        if store is not None:
            store.close()
        shutil.rmtree(store_folder, ignore_errors=True)  # also a store left half-written by a failed extraction
    positives = index.soft_positives_per_query
    global_recalls = reranked_recalls = None
    if positives is not None:
        global_recalls = recall_at_n(predictions, positives, settings.recall_values)
        reranked_recalls = recall_at_n(reranked, positives, settings.recall_values)
        if exact_predictions is not None:
            retrieval["exact_recalls"] = recall_at_n(exact_predictions, positives, settings.recall_values)
    bytes_per_image, tier = (store.bytes_per_image, store.tier) if store is not None else (0, None)
    return Evaluation(
        predictions, distances, reranked, scores, top, global_recalls, reranked_recalls, timings, bytes_per_image,
        tier, retrieval, rank_counts(index, settings, with_rerank),
    )  # fmt: skip


def rerank_shared(
    model: PRGSNetwork, store, predictions: np.ndarray, distances: np.ndarray, database_num: int, settings: EvalSettings
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """rerank() of every query; with several ranks each reranks its whole batches of queries and every rank
    receives all the rows (one process: rerank itself)."""
    own = distributed.shard_bounds(len(predictions), settings.rerank_batch_size)  # this rank's queries
    with distributed.stop_together("reranking"):
        reranked, scores, timings = rerank(
            model, store, predictions[own], distances[own], database_num, settings, own.start
        )
    return distributed.gather_rows(reranked), distributed.gather_rows(scores), timings


def global_retrieval(
    database: np.ndarray, queries: np.ndarray, k: int, settings: EvalSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """The k nearest database descriptors of each query: (squared distances, predictions) (Nq, k), exact faiss
    search or the settings.faiss_index index; with the latter also exact search's predictions (to report its recalls
    beside the index's), else None; and a report of the index and its timings. Rank 0 searches, every rank receives
    the result."""
    result = None
    with distributed.stop_together("searching the database"):
        if distributed.is_main():
            result = _search(database, queries, k, settings)
    return distributed.broadcast_object(result)


def _search(
    database: np.ndarray, queries: np.ndarray, k: int, settings: EvalSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """global_retrieval's search, in the process that runs it (with every core when the other ranks wait)."""
    with all_cores_for_faiss() if distributed.world_size() > 1 else contextlib.nullcontext():
        start = time.perf_counter()
        distances, predictions = exact_knn(database, queries, k, settings.device)
        exact_ms = 1000 * (time.perf_counter() - start) / max(1, len(queries))
        report = {"index": "Flat", "faiss_gpu": faiss_uses_gpu(settings.device), "ms_per_query": exact_ms}
        if settings.faiss_index is None:
            return distances, predictions, None, report
        approximate = approximate_knn(
            database,
            queries,
            k,
            settings.faiss_index,
            settings.faiss_nprobe,
            settings.faiss_train_size,
            settings.device,
        )
    report.update(index=settings.faiss_index, nprobe=settings.faiss_nprobe, exact_ms_per_query=exact_ms)
    report.update(train_size=min(settings.faiss_train_size, len(database)), **approximate[2])
    return approximate[0], approximate[1], predictions, report


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


def _with(settings: EvalSettings, **changes) -> EvalSettings:
    return EvalSettings(**{**asdict(settings), **changes})


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def recalls_table(evaluation: Evaluation) -> str:
    """A small text table of global and reranked recall@N."""
    if evaluation.global_recalls is None:
        return "no ground truth for this split: no recalls"
    values = list(evaluation.global_recalls)
    lines = ["".join([f"{'':10}"] + [f"{'R@' + str(n):>8}" for n in values])]
    rows = [("global", evaluation.global_recalls), ("reranked", evaluation.reranked_recalls)]
    if "exact_recalls" in evaluation.retrieval:  # --faiss_index: exact search's recalls beside the index's
        rows.insert(0, ("exact", evaluation.retrieval["exact_recalls"]))
    for label, recalls in rows:
        lines.append("".join([f"{label:10}"] + [f"{recalls[n]:8.2f}" for n in values]))
    return "\n".join(lines)


def write_predictions_csv(path: Path, index: PlaceIndex, evaluation: Evaluation) -> None:
    """predictions.csv (written atomically): per query and ranking (global, reranked), the first correct rank
    (1-based, empty when none or unknown) and the ranked database paths (relative to the split folder), separated
    by '|'."""
    positives = index.soft_positives_per_query
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["query_index", "query_path", "ranking", "first_correct_rank", "database_paths"])
    for ranking, predictions in (
        ("global", evaluation.global_predictions),
        ("reranked", evaluation.reranked_predictions),
    ):
        first = first_correct_rank(predictions, positives) if positives is not None else None
        for query, row in enumerate(predictions):
            correct = "" if first is None or first[query] >= len(row) else int(first[query]) + 1
            paths = "|".join(index.database_paths[i] for i in row)
            writer.writerow([query, index.queries_paths[query], ranking, correct, paths])
    util.atomic_write_text(path, text.getvalue())


def pictured_queries(index: PlaceIndex, evaluation: Evaluation, count: int, only_wrong: bool) -> np.ndarray:
    """The queries that get pictures: every query (count 0) or ``count`` of them spread evenly over the split, among
    those whose reranked top-1 is wrong when ``only_wrong`` (and the split has ground truth)."""
    queries = np.arange(index.queries_num)
    positives = index.soft_positives_per_query
    if only_wrong and positives is not None:
        top1 = evaluation.reranked_predictions[:, 0]
        queries = np.array([q for q in queries if top1[q] not in positives[q]], dtype=np.int64)
    if 0 < count < len(queries):
        queries = queries[np.unique(np.linspace(0, len(queries) - 1, count).round().astype(np.int64))]
    return queries


def _correct(index: PlaceIndex, query: int, database_ids: np.ndarray) -> list[bool | None]:
    """Whether each database image is a positive of the query; None each without ground truth."""
    if index.soft_positives_per_query is None:
        return [None] * len(database_ids)
    return np.isin(database_ids, index.soft_positives_per_query[query]).tolist()


def _picture_name(index: PlaceIndex, query: int) -> str:
    return f"{query:05d}_{Path(index.queries_paths[query]).stem[:60]}.png"


def save_prediction_pictures(
    folder: Path, index: PlaceIndex, evaluation: Evaluation, num_preds: int, queries: np.ndarray
) -> int:
    """A PNG per query of ``queries``: global and reranked top-N. Returns the count."""
    folder.mkdir(parents=True, exist_ok=True)
    for query in tqdm(queries, desc="saving pictures", unit="query", leave=False):
        rows = []
        for label, predictions in (
            ("global", evaluation.global_predictions),
            ("reranked", evaluation.reranked_predictions),
        ):
            top = predictions[query, :num_preds]
            rows.append((label, [index.root / index.database_paths[i] for i in top], _correct(index, query, top)))
        save_prediction_picture(folder / _picture_name(index, query), index.root / index.queries_paths[query], rows)
    return len(queries)


RERANK_PICTURE_STAGE = 1  # the first Patch-to-Region stage: 3x3 regions that tile the image


def save_rerank_pictures(
    folder: Path,
    model: PRGSNetwork,
    index: PlaceIndex,
    evaluation: Evaluation,
    settings: EvalSettings,
    queries: np.ndarray,
    num_candidates: int,
) -> int:
    """A PNG per query of ``queries`` (visualize.save_rerank_picture): its reranked top ``num_candidates`` with the
    region pairs the stage-1 cross graph matched and each candidate's global and reranked rank. Returns the count."""
    folder.mkdir(parents=True, exist_ok=True)
    grid = patch_grid(settings.image_size)
    boxes = stage_node_boxes(grid, model.backbone.patch_size)[RERANK_PICTURE_STAGE].numpy()  # (L_s, 4)
    region_grid = stage_grids(grid)["region"]
    top = min(num_candidates, evaluation.rerank_top)
    for query in tqdm(queries, desc="saving reranking pictures", unit="query", leave=False):
        query = int(query)
        candidates = evaluation.reranked_predictions[query, :top]
        images, attention = _cross_attention_of(model, index, query, candidates, settings)
        global_ranks = [int(np.flatnonzero(evaluation.global_predictions[query] == c)[0]) + 1 for c in candidates]
        shown = [
            RerankedCandidate(
                images[1 + rank],
                attention[rank],
                f"reranked #{rank + 1} (global #{global_ranks[rank]}), score "
                f"{evaluation.rerank_scores[query, rank]:.3f}, {_verdict(correct)}",
                correct,
            )
            for rank, correct in enumerate(_correct(index, query, candidates))
        ]
        name = Path(index.queries_paths[query]).name
        name = name if len(name) <= 60 else name[:57] + "..."
        heading = f"query {name}: stage-{RERANK_PICTURE_STAGE} cross-graph matches"
        path = folder / _picture_name(index, query)
        save_rerank_picture(path, images[0], shown, boxes, region_grid[0] * region_grid[1], heading)
    return len(queries)


def _cross_attention_of(
    model: PRGSNetwork, index: PlaceIndex, query: int, candidates: np.ndarray, settings: EvalSettings
) -> tuple[list[Image.Image], np.ndarray]:
    """The query and candidate images at the input size, and the attention (K, L_s, L_s) of the picture's cross
    graph with the candidates as one group. Local features are recomputed from the images in float32 (the evaluation
    read float16 ones from its store), so weights can differ from the evaluation's in the last digits."""
    paths = [index.absolute_path(index.database_num + query)] + [index.absolute_path(int(c)) for c in candidates]
    images = [open_rgb_image(path).resize(settings.image_size[::-1], Image.BILINEAR) for path in paths]
    batch = torch.stack([image_tensor(image, None) for image in images]).to(settings.device)  # (1+K, 3, H, W)
    model.eval()
    with torch.inference_mode():
        _, nodes = model(batch)  # (1+K, L, C)
        grid = patch_grid(settings.image_size)
        _, attention = cross_graph_attention(model.reranker, nodes[None], grid, stages=(RERANK_PICTURE_STAGE,))
    return images, attention[RERANK_PICTURE_STAGE][0].float().cpu().numpy()  # (K, L_s, L_s)


def _verdict(correct: bool | None) -> str:
    return "no ground truth" if correct is None else "correct" if correct else "wrong"


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    memory = {"peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        memory["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory


def eval_settings(args, device: torch.device) -> EvalSettings:
    """EvalSettings from the evaluation flags (shared with train_reranking.py's validation); "auto" resolved for the
    device. A fused kernel on the CPU is refused here, before any work."""
    kernel = rerank_kernel(resolve_auto(args.rerank_kernel, AUTO_RERANK_KERNEL, device))
    if kernel.fused and device.type != "cuda":
        raise util.PRGSError(
            f"--rerank_kernel {kernel.name} runs on CUDA only (device {device}); use stage0 (or plain) on the CPU"
        )
    if args.rerank_cuda_graphs and device.type != "cuda":
        logger.warning("--rerank_cuda_graphs has no effect on device %s (CUDA only)", device)
    # the reference's preprocessing resizes normalised pixels: only the PIL workers compute it (parser.py refuses
    # an explicit --image_decoder torchvision with it)
    image_decoder = "pil" if args.preprocessing == "reference" else args.image_decoder
    image_decoder = resolve_auto(image_decoder, AUTO_IMAGE_DECODER, device)
    return EvalSettings(
        image_size=tuple(args.resize),
        device=device,
        precision=args.precision,
        infer_batch_size=args.infer_batch_size,
        num_workers=args.num_workers,
        rerank_top=args.rerank_top,
        rerank_batch_size=args.rerank_batch_size,
        rerank_fusion=args.rerank_fusion,
        recall_values=args.recall_values,
        preprocessing=args.preprocessing,
        rerank_kernel=kernel.name,
        rerank_cuda_graphs=args.rerank_cuda_graphs,
        store_tier=args.store_tier,
        store_dtype=args.store_dtype,
        image_decoder=image_decoder,
        faiss_index=args.faiss_index,
        faiss_nprobe=args.faiss_nprobe,
        faiss_train_size=args.faiss_train_size,
    )


def resolve_auto(value: str, auto: dict[str, str], device: torch.device) -> str:
    """``value``, or what ``auto`` picks for the device type when it is "auto"."""
    return auto[device.type] if value == "auto" else value


def recalls_by_name(evaluation: Evaluation) -> dict:
    """{"global": {"R@N": percent}, "reranked": {...}}, None for a split without ground truth."""

    def by_name(recalls):
        return None if recalls is None else {f"R@{n}": round(v, 4) for n, v in recalls.items()}

    return {"global": by_name(evaluation.global_recalls), "reranked": by_name(evaluation.reranked_recalls)}


def build_results(
    args,
    split: str,
    index: PlaceIndex,
    model: PRGSNetwork,
    checkpoint,
    evaluation: Evaluation,
    device: torch.device,
    seconds: float,
) -> dict:
    """The machine-readable summary written to results.json (fields in docs/outputs.md)."""
    results = {
        "dataset": {
            "name": args.dataset_name,
            "split": split,
            "root": str(index.root),
            "database_num": index.database_num,
            "queries_num": index.queries_num,
            "excluded_images": [{"path": p, "reason": r} for p, r in index.excluded],
        },
        "recalls": recalls_by_name(evaluation),
        "rerank_top": evaluation.rerank_top,
        "timings": {**{k: round(v, 4) for k, v in evaluation.timings.items()}, "total_seconds": round(seconds, 2)},
        "memory": {k: round(v, 1) for k, v in peak_memory_mb(device).items()},
        "store": {
            "tier": evaluation.store_tier,
            "bytes_per_image": evaluation.store_bytes_per_image,
            "reference_bytes_per_image": REFERENCE_BYTES_PER_IMAGE,
            "fraction_of_reference": round(evaluation.store_bytes_per_image / REFERENCE_BYTES_PER_IMAGE, 4),
        },
        "retrieval": retrieval_summary(evaluation.retrieval),
        "distributed": evaluation.ranks,
        "model": model.config.to_dict(),
        "checkpoint": None if checkpoint is None else {"path": str(checkpoint.path), "layout": checkpoint.layout},
        "environment": {
            "device": str(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "faiss_gpu": faiss_uses_gpu(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "configuration": runs.plain_args(args),
    }
    if args.dataset_name == "msls" and evaluation.global_recalls is not None:
        ks = [n for n in args.recall_values if n <= evaluation.global_predictions.shape[1]]
        results["msls_map"] = {
            label: {
                f"mAP@{k}": round(v, 4)
                for k, v in msls_map_at_k(predictions, index.soft_positives_per_query, ks).items()
            }
            for label, predictions in (
                ("global", evaluation.global_predictions),
                ("reranked", evaluation.reranked_predictions),
            )
        }
    return results


def retrieval_summary(retrieval: dict) -> dict:
    """The retrieval report as results.json holds it: times rounded, exact recalls keyed R@N."""
    summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in retrieval.items() if k != "exact_recalls"}
    if "exact_recalls" in retrieval:
        summary["exact_recalls"] = {f"R@{n}": round(v, 4) for n, v in retrieval["exact_recalls"].items()}
    return summary


def write_outputs(args, output_folder: Path, index: PlaceIndex, evaluation: Evaluation, results: dict) -> None:
    """predictions.csv, on MSLS test the challenge files, the pictures, and results.json last; each atomically."""
    output_folder.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(output_folder / "predictions.csv", index, evaluation)
    if args.dataset_name == "msls" and index.soft_positives_per_query is None:
        results["msls_submission"] = {}
        for label, predictions in (
            ("global", evaluation.global_predictions),
            ("reranked", evaluation.reranked_predictions),
        ):
            csv_path = output_folder / f"msls_submission_{label}.csv"
            write_msls_submission(csv_path, index.queries_keys, index.database_keys, predictions)
            results["msls_submission"][label] = zip_msls_submission(csv_path).name
            logger.info("MSLS challenge submission (%s ranking): %s", label, csv_path.with_suffix(".zip"))
    if args.num_preds_to_save > 0:
        queries = pictured_queries(index, evaluation, args.num_queries_to_save, args.save_only_wrong_preds)
        saved = save_prediction_pictures(
            output_folder / "predictions", index, evaluation, args.num_preds_to_save, queries
        )
        logger.info("saved %d prediction pictures in %s", saved, output_folder / "predictions")
    util.atomic_write_text(output_folder / "results.json", json.dumps(results, indent=2))
