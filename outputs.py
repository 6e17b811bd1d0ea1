"""Outputs of an evaluation (docs/outputs.md), made from its result and the OutputOptions, never from argparse: the
recall table, results.json, predictions.csv, the MSLS challenge files, the pictures of the predictions and of the
reranking, and report.html (report.py). Every file is written atomically."""

from __future__ import annotations

import csv
import io
import json
import logging
import platform
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import util
from config import EvalSettings, OutputOptions
from evaluation import Evaluation
from feature_store import REFERENCE_BYTES_PER_IMAGE
from metrics import first_correct_rank, msls_map, peak_memory_mb
from model.backbone import patch_grid
from model.checkpoint import LoadedCheckpoint
from model.correspondences import cross_graph_attention, stage_node_boxes
from model.network import PRGSNetwork
from model.reranker import stage_grids
from places.images import image_tensor, open_rgb_image
from places.index import PlaceIndex
from places.msls_protocol import write_msls_submission, zip_msls_submission
from report import ReportData, changes_summary, reranking_changes, write_report
from retrieval import faiss_uses_gpu
from visualize import RerankedCandidate, save_prediction_picture, save_rerank_picture

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Tables and results.json


def reranked_recalls_in_reach(evaluation: Evaluation) -> dict[int, float | None] | None:
    """The reranked recall@N, None for each N past the reranked candidates (N > rerank_top while the predictions go
    further): there the reranked order is the global one, where the reference kept the reranked candidates only
    (its R@N counts those). None without ground truth."""
    recalls = evaluation.reranked_recalls
    if recalls is None:
        return None
    return {n: None if past_reranked(evaluation, n) else value for n, value in recalls.items()}


def past_reranked(evaluation: Evaluation, n: int) -> bool:
    """Whether the first n reranked predictions reach past the reranked candidates (n > rerank_top while the
    predictions go further): a reranked metric at n would score the global order there."""
    return evaluation.rerank_top < min(n, evaluation.reranked_predictions.shape[1])


def msls_maps_in_reach(evaluation: Evaluation, positives: Sequence[np.ndarray]) -> dict[str, dict[str, float | None]]:
    """The MSLS protocol's mAP@k of both rankings for each recall value k within the predictions; a reranked mAP@k
    past the reranked candidates is None, as the reranked R@N there (reranked_recalls_in_reach)."""
    ks = [n for n in evaluation.global_recalls if n <= evaluation.global_predictions.shape[1]]
    maps = msls_map(_rankings(evaluation), positives, ks)
    for k in ks:
        if past_reranked(evaluation, k):
            maps["reranked"][f"mAP@{k}"] = None
    return maps


def recalls_table(evaluation: Evaluation) -> str:
    """A small text table of global and reranked recall@N ("-": past the reranked candidates, said under it)."""
    if evaluation.global_recalls is None:
        return "no ground truth for this split: no recalls"
    values = list(evaluation.global_recalls)
    reranked = reranked_recalls_in_reach(evaluation)
    lines = ["".join([f"{'':10}"] + [f"{'R@' + str(n):>8}" for n in values])]
    rows = [("global", evaluation.global_recalls), ("reranked", reranked)]
    if "exact_recalls" in evaluation.retrieval:  # --faiss_index: exact search's recalls beside the index's
        rows.insert(0, ("exact", evaluation.retrieval["exact_recalls"]))
    for label, recalls in rows:
        lines.append(
            "".join([f"{label:10}"] + [f"{'-':>8}" if recalls[n] is None else f"{recalls[n]:8.2f}" for n in values])
        )
    past = [f"R@{n}" for n in values if reranked[n] is None]
    if past:
        lines.append(
            f"reranked {', '.join(past)}: '-', past the {evaluation.rerank_top} reranked candidates (the global order "
            "continues there)"
        )
    return "\n".join(lines)


def recalls_by_name(evaluation: Evaluation) -> dict:
    """{"global": {"R@N": percent}, "reranked": {...}}, None for a split without ground truth; a reranked R@N past
    the reranked candidates is None (reranked_recalls_in_reach)."""

    def by_name(recalls):
        return None if recalls is None else {f"R@{n}": None if v is None else round(v, 4) for n, v in recalls.items()}

    return {"global": by_name(evaluation.global_recalls), "reranked": by_name(reranked_recalls_in_reach(evaluation))}


def summary_text(index: PlaceIndex, evaluation: Evaluation, results: dict) -> str:
    """The console's summary of an evaluation: the split, the recalls table and, with ground truth, one line of what
    reranking changed (results["reranking_changes"])."""
    lines = [index.summary(), recalls_table(evaluation)]
    if results.get("reranking_changes") is not None:
        lines.append(changes_summary(results["reranking_changes"]))
    return "\n".join(lines)


def build_results(
    evaluation: Evaluation,
    index: PlaceIndex,
    split: str | None,
    options: OutputOptions,
    *,
    model: PRGSNetwork,
    checkpoint: LoadedCheckpoint | None,
    device: torch.device,
    seconds: float,
    configuration: dict,
) -> dict:
    """The machine-readable summary written to results.json (fields in docs/outputs.md): the evaluation of ``split``
    of the dataset options.dataset_name by ``model`` (loaded from ``checkpoint``) on ``device`` in ``seconds``, with
    the run's flags as ``configuration``."""
    results = {
        "dataset": {
            "name": options.dataset_name,
            "split": split,
            "root": str(index.root),
            "database_num": index.database_num,
            "queries_num": index.queries_num,
            "excluded_images": [{"path": p, "reason": r} for p, r in index.excluded],
        },
        "recalls": recalls_by_name(evaluation),
        "rerank_top": evaluation.rerank_top,
        "reranking_changes": reranking_changes(
            evaluation.global_predictions,
            evaluation.reranked_predictions,
            index.soft_positives_per_query,
            evaluation.rerank_top,
        ),
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
        "resolved": evaluation.resolved,
        "model": model.config.to_dict(),
        "checkpoint": None if checkpoint is None else {"path": str(checkpoint.path), "layout": checkpoint.layout},
        "environment": {
            "device": str(device),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "faiss_gpu": faiss_uses_gpu(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
        "configuration": configuration,
    }
    if options.dataset_name == "msls" and evaluation.global_recalls is not None:
        results["msls_map"] = msls_maps_in_reach(evaluation, index.soft_positives_per_query)
    return results


def retrieval_summary(retrieval: dict) -> dict:
    """The retrieval report as results.json holds it: times rounded, exact recalls keyed R@N."""
    summary = {k: round(v, 4) if isinstance(v, float) else v for k, v in retrieval.items() if k != "exact_recalls"}
    if "exact_recalls" in retrieval:
        summary["exact_recalls"] = {f"R@{n}": round(v, 4) for n, v in retrieval["exact_recalls"].items()}
    return summary


def _rankings(evaluation: Evaluation) -> dict[str, np.ndarray]:
    """The two rankings of an evaluation by label: global and reranked predictions (Nq, K)."""
    return {"global": evaluation.global_predictions, "reranked": evaluation.reranked_predictions}


# ----------------------------------------------------------------------------------------------------------------
# Files


def write_outputs(
    output_folder: Path,
    index: PlaceIndex,
    evaluation: Evaluation,
    results: dict,
    options: OutputOptions,
    *,
    model: PRGSNetwork | None = None,
    settings: EvalSettings | None = None,
) -> None:
    """Every output of an evaluation, each atomically: predictions.csv, on MSLS test the challenge files, the
    prediction pictures, the reranking pictures (they need ``model`` and the evaluation's ``settings``), report.html
    (options.writes_report), and results.json last. The challenge files' names are added to ``results``."""
    output_folder.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(output_folder / "predictions.csv", index, evaluation)
    if options.dataset_name == "msls" and index.soft_positives_per_query is None:
        results["msls_submission"] = write_msls_submissions(output_folder, index, evaluation)
    queries = pictured_queries(index, evaluation, options.num_queries_to_save, options.save_only_wrong_preds)
    if options.num_preds_to_save > 0:
        saved = save_prediction_pictures(
            output_folder / "predictions", index, evaluation, options.num_preds_to_save, queries
        )
        logger.info("saved %d prediction pictures in %s", saved, output_folder / "predictions")
    correspondences = {}
    if options.rerank_pictures > 0:
        if model is None or settings is None:
            raise ValueError("reranking pictures (rerank_pictures > 0) need the model and the evaluation's settings")
        correspondences = save_rerank_pictures(
            output_folder / "reranking", model, index, evaluation, settings, queries, options.rerank_pictures
        )
        logger.info("saved %d reranking pictures in %s", len(correspondences), output_folder / "reranking")
    if options.writes_report:
        write_report(output_folder / "report.html", report_data(index, evaluation, correspondences))
        logger.info("report: %s (open it in any browser)", output_folder / "report.html")
    util.atomic_write_text(output_folder / "results.json", json.dumps(results, indent=2))


def report_data(index: PlaceIndex, evaluation: Evaluation, correspondences: dict[int, Path]) -> ReportData:
    """What report.html shows of an evaluation of ``index``, with the reranking pictures by query index."""
    paths = index.absolute_paths()  # database first, then queries
    return ReportData(
        split_name=index.name,
        query_paths=paths[index.database_num :],
        database_paths=paths[: index.database_num],
        global_predictions=evaluation.global_predictions,
        reranked_predictions=evaluation.reranked_predictions,
        positives=index.soft_positives_per_query,
        global_recalls=evaluation.global_recalls,
        reranked_recalls=reranked_recalls_in_reach(evaluation),
        rerank_top=evaluation.rerank_top,
        correspondence_pictures=correspondences,
    )


def write_msls_submissions(output_folder: Path, index: PlaceIndex, evaluation: Evaluation) -> dict[str, str]:
    """The MSLS challenge's file of each ranking, zipped (places/msls.py): {label: the zip file's name}."""
    names = {}
    for label, predictions in _rankings(evaluation).items():
        csv_path = output_folder / f"msls_submission_{label}.csv"
        write_msls_submission(csv_path, index.queries_keys, index.database_keys, predictions)
        names[label] = zip_msls_submission(csv_path).name
        logger.info("MSLS challenge submission (%s ranking): %s", label, csv_path.with_suffix(".zip"))
    return names


def write_predictions_csv(path: Path, index: PlaceIndex, evaluation: Evaluation) -> None:
    """predictions.csv (written atomically): per query and ranking (global, reranked), the first correct rank
    (1-based, empty when none or unknown) and the ranked database paths (relative to the split folder), separated
    by '|'."""
    positives = index.soft_positives_per_query
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["query_index", "query_path", "ranking", "first_correct_rank", "database_paths"])
    for ranking, predictions in _rankings(evaluation).items():
        first = first_correct_rank(predictions, positives) if positives is not None else None
        for query, row in enumerate(predictions):
            correct = "" if first is None or first[query] >= len(row) else int(first[query]) + 1
            paths = "|".join(index.database_paths[i] for i in row)
            writer.writerow([query, index.queries_paths[query], ranking, correct, paths])
    util.atomic_write_text(path, text.getvalue())


def read_top1_hits(path: Path) -> dict[str, np.ndarray]:
    """A predictions.csv (write_predictions_csv) -> per ranking ("global", "reranked"), whether each query's top-1
    is correct, (Nq,) bool in query order; for paired comparisons of the two rankings (metrics.paired_bootstrap)."""
    hits: dict[str, dict[int, bool]] = {"global": {}, "reranked": {}}
    with open(path, newline="") as file:
        for row in csv.DictReader(file):
            hits[row["ranking"]][int(row["query_index"])] = row["first_correct_rank"] == "1"
    if sorted(hits["global"]) != sorted(hits["reranked"]):
        raise ValueError(f"{path}: the global and reranked rows name different queries")
    return {ranking: np.array([by_query[q] for q in sorted(by_query)]) for ranking, by_query in hits.items()}


# ----------------------------------------------------------------------------------------------------------------
# Pictures


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
        for label, predictions in _rankings(evaluation).items():
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
) -> dict[int, Path]:
    """A PNG per query of ``queries`` (visualize.save_rerank_picture): its reranked top ``num_candidates`` with the
    region pairs the stage-1 cross graph matched and each candidate's global and reranked rank. Returns
    {query index: the PNG's path}."""
    folder.mkdir(parents=True, exist_ok=True)
    grid = patch_grid(settings.image_size)
    boxes = stage_node_boxes(grid, model.backbone.patch_size)[RERANK_PICTURE_STAGE].numpy()  # (L_s, 4)
    region_grid = stage_grids(grid)["region"]
    top = min(num_candidates, evaluation.rerank_top)
    saved = {}
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
        saved[query] = path
    return saved


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
