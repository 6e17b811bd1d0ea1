"""The official MSLS numbers (mapillary_sls/utils/eval.py definitions: AP@k, mAP@k) and the challenge's submission
file (the format of mapillary_sls' evaluate.py), zipped for the upload (docs/outputs.md)."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from util import atomic_write

logger = logging.getLogger(__name__)


def msls_average_precision_at_k(ranked: np.ndarray, positives: np.ndarray, k: int) -> float:
    """AP@k of one query as in mapillary_sls (fraction): over the first k predictions, at each rank i (1-based)
    holding a positive not already predicted, add hits_so_far / i; divide by min(number of positives, k)."""
    if len(positives) == 0:
        raise ValueError("AP@k is undefined for a query without positives (mapillary_sls divides by zero)")
    positive_set = set(np.asarray(positives).tolist())
    seen, hits, score = set(), 0, 0.0
    for rank, prediction in enumerate(np.asarray(ranked)[:k].tolist(), start=1):
        if prediction in positive_set and prediction not in seen:
            hits += 1
            score += hits / rank
        seen.add(prediction)
    return score / min(len(positive_set), k)


def msls_map_at_k(
    predictions: np.ndarray, positives: Sequence[np.ndarray], ks: Sequence[int] = (1, 5, 10, 20)
) -> dict[int, float]:
    """mAP@k in PERCENT: the mean over queries of msls_average_precision_at_k (mapillary_sls returns fractions).
    Every query must have at least one positive (as in the official val protocol)."""
    predictions = _checked_predictions(predictions, positives, ks)
    without = [q for q, p in enumerate(positives) if len(p) == 0]
    if without:
        raise ValueError(
            f"mAP@k needs at least one positive per query; queries {without[:5]} ({len(without)} in all) have none"
        )
    return {
        int(k): float(
            np.mean(
                [
                    msls_average_precision_at_k(ranked, query_positives, k)
                    for ranked, query_positives in zip(predictions, positives)
                ]
            )
            * 100.0
        )
        for k in ks
    }


def _checked_predictions(predictions: np.ndarray, positives: Sequence[np.ndarray], ks: Sequence[int]) -> np.ndarray:
    """predictions as an (Nq, K) integer array, with one positives entry per query and every k in 1..K."""
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or not np.issubdtype(predictions.dtype, np.integer):
        raise ValueError(
            f"predictions must be an (Nq, K) integer array, got shape {predictions.shape} dtype {predictions.dtype}"
        )
    if len(predictions) != len(positives):
        raise ValueError(f"predictions has {len(predictions)} rows but there are {len(positives)} positive lists")
    if len(predictions) == 0:
        raise ValueError("no queries to evaluate")
    bad_ks = [k for k in ks if not 1 <= int(k) <= predictions.shape[1]]
    if not ks or bad_ks:
        raise ValueError(
            f"ks must be in 1..{predictions.shape[1]} (the number of predictions per query), got {list(ks)}"
        )
    return predictions


def write_msls_submission(
    path: str | Path, queries_keys: Sequence[str], database_keys: Sequence[str], predictions: np.ndarray
) -> None:
    """Write the challenge's prediction file atomically (the format of mapillary_sls' evaluate.py, a .csv whose
    lines are space separated): one line per query, 'query_key pred_key_1 ... pred_key_K', no header.
    predictions: (Nq, K) database indices, best first, distinct within a row. zip_msls_submission packs it for
    the upload."""
    predictions = np.asarray(predictions)
    if (
        predictions.ndim != 2
        or len(predictions) != len(queries_keys)
        or not np.issubdtype(predictions.dtype, np.integer)
    ):
        raise ValueError(
            f"predictions must be an ({len(queries_keys)}, K) integer array (one row per query), got "
            f"shape {predictions.shape} dtype {predictions.dtype}"
        )
    lines = []
    for query_key, ranked in zip(queries_keys, predictions.tolist()):
        out_of_range = [i for i in ranked if not 0 <= i < len(database_keys)]
        if out_of_range:
            raise ValueError(
                f"query {query_key}: predictions {out_of_range[:5]} are not database indices "
                f"0..{len(database_keys) - 1}"
            )
        if len(set(ranked)) != len(ranked):
            raise ValueError(f"query {query_key}: the same database image is predicted more than once")
        lines.append(" ".join([query_key] + [database_keys[i] for i in ranked]) + "\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write("".join(lines).encode()))
    logger.info(
        "wrote the MSLS submission file %s (%d queries, %d predictions each)", path, len(lines), predictions.shape[1]
    )


def zip_msls_submission(csv_path: str | Path) -> Path:
    """The challenge's upload: a .zip (beside csv_path, same stem) holding the one .csv, written atomically.
    Returns its path."""
    csv_path = Path(csv_path)
    zip_path = csv_path.with_suffix(".zip")

    def write(file) -> None:
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.write(csv_path, arcname=csv_path.name)

    atomic_write(zip_path, write)
    return zip_path
