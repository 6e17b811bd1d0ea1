"""Evaluation of one split: extract -> local-feature store -> global retrieval -> rerank -> recall@N -> outputs.

``evaluate`` is what test.py runs and what training validates with. The outputs (results.json, predictions.csv)
are described in docs/outputs.md. Under torchrun the ranks share the extraction (each its whole batches of the
database and of the queries, into a store of its own) and the reranking (each its whole batches of queries); rank 0
searches; every rank ends with the same Evaluation, equal to a one-process run's (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import csv
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
from tqdm import tqdm

import distributed
import util
from extraction import image_batches
from feature_store import REFERENCE_BYTES_PER_IMAGE, LocalFeatureStore
from model.backbone import patch_grid
from model.network import PRGSNetwork
from places.index import PlaceIndex
from places.msls import msls_map_at_k, write_msls_submission
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
from visualize import save_prediction_picture

logger = logging.getLogger(__name__)


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
    retrieval: dict = field(default_factory=dict)  # the index searched; with --faiss_index, exact search beside it
    ranks: dict = field(default_factory=dict)  # world_size, images_per_rank (extracted), queries_per_rank (reranked)


# ----------------------------------------------------------------------------------------------------------------
# Extraction


def extract_features(
    model: PRGSNetwork, index: PlaceIndex, settings: EvalSettings, store_folder: Path | None
) -> tuple[np.ndarray, LocalFeatureStore | ShardedStore | None, dict[str, float]]:
    """Global descriptors (N, D) in RAM and local features in a LocalFeatureStore, database first, then queries.

    Returns (descriptors, the store opened for reading, timings): extraction_ms_per_image (loading included) and
    forward_ms_per_image (network only, device synchronised), each for database and queries, of this rank's images.
    With store_folder None only global descriptors are computed (global-only forward) and no store is returned.
    With several ranks each extracts its whole batches (shard_layout) into store_folder/rank_<r>, every rank receives
    all descriptors, and the store returned reads every rank's part.
    """
    world, store = distributed.world_size(), None
    holder, rows = shard_layout(index.database_num, index.queries_num, settings.infer_batch_size, world)
    mine = holder == distributed.rank()
    if store_folder is not None:
        own_folder = store_folder if world == 1 else store_folder / f"rank_{distributed.rank()}"
        store = _create_store(model, settings, own_folder, int(mine.sum()))
    descriptors = np.empty((len(index), model.config.fc_output_dim), dtype=np.float32)
    timings = {}
    for part, image_ids in (
        ("database", np.arange(index.database_num)),
        ("queries", np.arange(index.database_num, len(index))),
    ):
        own = image_ids[mine[image_ids]]
        forward = util.Stopwatch(settings.device)
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
            ):
                descriptors[ids] = (output if store is None else output[0]).float().cpu().numpy()
                if store is not None:
                    store.write(rows[ids], output[1])
        count = max(1, len(own))
        timings[f"extraction_ms_per_image_{part}"] = 1000 * (time.perf_counter() - start) / count
        timings[f"forward_ms_per_image_{part}"] = 1000 * forward.seconds / count
        if world > 1:
            descriptors[image_ids] = distributed.gather_rows(descriptors[own])
    if store is None:
        return descriptors, None, timings
    with distributed.stop_together("writing the local-feature store"):
        store.close()
    if world == 1:
        return descriptors, LocalFeatureStore.open(store_folder), timings
    return descriptors, ShardedStore.open(store_folder, holder, rows), timings


def _create_store(model: PRGSNetwork, settings: EvalSettings, folder: Path, num_images: int) -> LocalFeatureStore:
    return LocalFeatureStore.create(
        folder,
        num_images,
        patch_grid(settings.image_size),
        settings.image_size,
        model.backbone.patch_size,
        model.config.num_kept_nodes,
        model.config.local_dim,
    )


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


class ShardedStore:
    """The local-feature stores of several ranks (one LocalFeatureStore each, in <folder>/rank_<r>) read as one:
    rows of any image come from the store that holds it (shard_layout). Offers what rerank and evaluate use:
    read_compact, expand, bytes_per_image, close."""

    def __init__(self, stores: list[LocalFeatureStore], holder: np.ndarray, rows: np.ndarray):
        self.stores, self.holder, self.rows = stores, holder, rows

    @classmethod
    def open(cls, folder: Path, holder: np.ndarray, rows: np.ndarray) -> ShardedStore:
        return cls([LocalFeatureStore.open(folder / f"rank_{r}") for r in range(holder.max() + 1)], holder, rows)

    def read_compact(self, image_indices: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """As LocalFeatureStore.read_compact: ([attention, f] (n, num_kept, 1 + local_dim) float16, grid positions
        (n, num_kept) int64) of ``image_indices`` (indices of the split), in that order."""
        image_indices = np.asarray(image_indices, dtype=np.int64).reshape(-1)
        first = self.stores[0]
        features = torch.empty(len(image_indices), first.num_kept, first.channels, dtype=torch.float16)
        positions = torch.empty(len(image_indices), first.num_kept, dtype=torch.int64)
        for number, store in enumerate(self.stores):
            wanted = np.flatnonzero(self.holder[image_indices] == number)
            if len(wanted):
                part = torch.from_numpy(wanted)
                features[part], positions[part] = store.read_compact(self.rows[image_indices[wanted]])
        return features, positions

    def expand(self, features: torch.Tensor, positions: torch.Tensor, device: torch.device | str = "cpu"):
        return self.stores[0].expand(features, positions, device)

    @property
    def bytes_per_image(self) -> int:
        return self.stores[0].bytes_per_image

    def close(self) -> None:
        for store in self.stores:
            store.close()


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
    columns after rerank_top left in global order, final scores (Nq, rerank_top), timings). ``store`` is a
    LocalFeatureStore (or anything with its read_compact/expand): the next batch of queries is read in a background
    thread while this one runs, and rows are expanded to the reranker's input on the device. Row i of predictions
    is query ``first_query + i`` (a rank's part of the queries).
    """
    top = settings.rerank_top
    num_queries = len(predictions)
    grid = patch_grid(settings.image_size)
    reranked = predictions.copy()
    scores = np.empty((num_queries, top), dtype=np.float32)
    batches = [
        np.arange(s, min(s + settings.rerank_batch_size, num_queries))
        for s in range(0, num_queries, settings.rerank_batch_size)
    ]

    def read_batch(queries: np.ndarray):
        """Compact rows of the queries and their candidates (file reads only; runs in the background thread)."""
        query_images = database_num + first_query + queries
        return store.read_compact(np.concatenate([query_images, predictions[queries, :top].reshape(-1)]))

    forward = util.Stopwatch(settings.device)
    start = time.perf_counter()
    model.eval()
    with ThreadPoolExecutor(max_workers=1) as reader, torch.inference_mode():
        pending = reader.submit(read_batch, batches[0]) if batches else None
        for number, queries in enumerate(tqdm(batches, desc="reranking", unit="batch", leave=False)):
            compact = pending.result()
            if number + 1 < len(batches):
                pending = reader.submit(read_batch, batches[number + 1])
            nodes = store.expand(*compact, device=settings.device)  # (b + b*K, L, C)
            query_nodes = nodes[: len(queries)]  # (b, L, C)
            candidate_nodes = nodes[len(queries) :].reshape(len(queries), top, *nodes.shape[1:])  # (b, K, L, C)
            with forward, util.autocast(settings.device, settings.precision):
                probabilities = model.rerank(query_nodes, candidate_nodes, grid=grid).float().cpu().numpy()  # (b, K)
            batch_scores = fused_scores(probabilities, distances[queries, :top], settings.rerank_fusion)
            order = np.argsort(-batch_scores, axis=1, kind="stable")  # (b, K)
            reranked[queries, :top] = np.take_along_axis(predictions[queries, :top], order, axis=1)
            scores[queries] = np.take_along_axis(batch_scores, order, axis=1)
    elapsed = time.perf_counter() - start
    timings = {
        "rerank_ms_per_query": 1000 * elapsed / max(1, num_queries),
        "rerank_forward_ms_per_query": 1000 * forward.seconds / max(1, num_queries),
    }
    return reranked, scores, timings


# ----------------------------------------------------------------------------------------------------------------
# Whole evaluation


def evaluate(
    model: PRGSNetwork, index: PlaceIndex, settings: EvalSettings, work_folder: Path, with_rerank: bool = True
) -> Evaluation:
    """Extract, retrieve, rerank and score one split. The local-feature store lives in work_folder/local_features
    and is deleted at the end. with_rerank=False skips the reranking (reranked = global order). With several ranks
    each reranks its whole batches of queries and every rank returns the whole Evaluation."""
    store_folder = work_folder / "local_features"
    descriptors, store, timings = extract_features(model, index, settings, store_folder if with_rerank else None)
    own = distributed.shard_bounds(index.queries_num, settings.rerank_batch_size)  # this rank's queries to rerank
    try:
        database, queries = descriptors[: index.database_num], descriptors[index.database_num :]
        top = clamp_top_k(settings.rerank_top, index.database_num)
        num_columns = clamp_top_k(max(top, max(settings.recall_values)), index.database_num, "recall@N")
        distances, predictions, exact_predictions, retrieval = global_retrieval(
            database, queries, num_columns, settings
        )
        timings["retrieval_ms_per_query"] = retrieval["ms_per_query"]
        if with_rerank:
            with distributed.stop_together("reranking"):
                reranked, scores, rerank_timings = rerank(
                    model,
                    store,
                    predictions[own],
                    distances[own],
                    index.database_num,
                    _with(settings, rerank_top=top),
                    own.start,
                )
            reranked, scores = distributed.gather_rows(reranked), distributed.gather_rows(scores)
            timings.update(rerank_timings)
        else:
            reranked, scores = predictions, np.full((len(predictions), top), np.nan, dtype=np.float32)
    finally:
        if store is not None:
            store.close()
            shutil.rmtree(store_folder, ignore_errors=True)
    positives = index.soft_positives_per_query
    global_recalls = reranked_recalls = None
    if positives is not None:
        global_recalls = recall_at_n(predictions, positives, settings.recall_values)
        reranked_recalls = recall_at_n(reranked, positives, settings.recall_values)
        if exact_predictions is not None:
            retrieval["exact_recalls"] = recall_at_n(exact_predictions, positives, settings.recall_values)
    return Evaluation(
        predictions,
        distances,
        reranked,
        scores,
        top,
        global_recalls,
        reranked_recalls,
        timings,
        store.bytes_per_image if store is not None else 0,
        retrieval,
        rank_counts(index, settings, with_rerank),
    )


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
    """predictions.csv: per query and ranking (global, reranked), the first correct rank (1-based, empty when
    none or unknown) and the ranked database paths (relative to the split folder), separated by '|'."""
    positives = index.soft_positives_per_query
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["query_index", "query_path", "ranking", "first_correct_rank", "database_paths"])
        for ranking, predictions in (
            ("global", evaluation.global_predictions),
            ("reranked", evaluation.reranked_predictions),
        ):
            first = first_correct_rank(predictions, positives) if positives is not None else None
            for query, row in enumerate(predictions):
                correct = "" if first is None or first[query] >= len(row) else int(first[query]) + 1
                writer.writerow(
                    [
                        query,
                        index.queries_paths[query],
                        ranking,
                        correct,
                        "|".join(index.database_paths[i] for i in row),
                    ]
                )


def save_prediction_pictures(
    folder: Path, index: PlaceIndex, evaluation: Evaluation, num_preds: int, only_wrong: bool
) -> int:
    """A PNG per query (or per query whose reranked top-1 is wrong): global and reranked top-N. Returns count."""
    folder.mkdir(parents=True, exist_ok=True)
    positives = index.soft_positives_per_query
    saved = 0
    for query in tqdm(range(index.queries_num), desc="saving pictures", unit="query", leave=False):
        rows = []
        for label, predictions in (
            ("global", evaluation.global_predictions),
            ("reranked", evaluation.reranked_predictions),
        ):
            top = predictions[query, :num_preds]
            correct = np.isin(top, positives[query]) if positives is not None else np.zeros(len(top), bool)
            rows.append((label, [index.root / index.database_paths[i] for i in top], correct.tolist()))
        if only_wrong and positives is not None and rows[1][2][0]:
            continue
        name = f"{query:05d}_{Path(index.queries_paths[query]).stem[:60]}.png"
        save_prediction_picture(folder / name, index.root / index.queries_paths[query], rows)
        saved += 1
    return saved


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    memory = {"peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        memory["peak_gpu_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory


def eval_settings(args, device: torch.device) -> EvalSettings:
    """EvalSettings from the evaluation flags (shared with train_reranking.py's validation)."""
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
        faiss_index=args.faiss_index,
        faiss_nprobe=args.faiss_nprobe,
        faiss_train_size=args.faiss_train_size,
    )


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
        "configuration": util.plain_args(args),
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
    output_folder.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(output_folder / "predictions.csv", index, evaluation)
    if args.dataset_name == "msls" and index.soft_positives_per_query is None:
        for label, predictions in (
            ("global", evaluation.global_predictions),
            ("reranked", evaluation.reranked_predictions),
        ):
            path = output_folder / f"msls_submission_{label}.txt"
            write_msls_submission(path, index.queries_keys, index.database_keys, predictions)
            logger.info("MSLS challenge submission (%s ranking): %s", label, path)
        results["msls_submission"] = {
            "global": "msls_submission_global.txt",
            "reranked": "msls_submission_reranked.txt",
        }
    if args.num_preds_to_save > 0:
        saved = save_prediction_pictures(
            output_folder / "predictions", index, evaluation, args.num_preds_to_save, args.save_only_wrong_preds
        )
        logger.info("saved %d prediction pictures in %s", saved, output_folder / "predictions")
    (output_folder / "results.json").write_text(json.dumps(results, indent=2))
