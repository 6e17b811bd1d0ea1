"""Hard-negative mining: the offline hard-negative file, and the online tuple miner used during training.

The hard-negative file (written by pre_compute_mining.py, read by train_reranking.py --mining global) is described
in docs/hard_negatives.md; training refuses a file made for other images and says how to rebuild it.

Tuples: (query, best positive, negatives). The best positive is the hard positive (10 m) nearest to the query in
descriptor space. Negatives by mode: "global" samples from the first --neg_hardness entries of the file;
"partial" takes the hardest among --neg_samples_num random database images; "full" the hardest among those and
the query's previous negatives; "random" samples at random. Soft positives (25 m) and -1 are never negatives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from places.index import PlaceIndex
from retrieval import exact_knn
from schema import Field, check_fields
from util import PRGSError, atomic_write

logger = logging.getLogger(__name__)

HARD_NEGATIVES_FORMAT = "prgs-hard-negatives"
HARD_NEGATIVES_VERSION = 1
MINING_MODES = ("global", "partial", "full", "random")
# the arrays of the hard-negative file (docs/hard_negatives.md); Nq: training queries, N: database + query images
HARD_NEGATIVES_FIELDS = {
    "hard_negatives": Field("iu", ("Nq", None), minimum=-1),
    "metadata": Field("U"),
    "image_sizes": Field("iu", ("N",), minimum=0, required=False),
    "image_mtimes_ns": Field("iu", ("N",), required=False),
}
IMAGE_STAT_FIELDS = ("image_sizes", "image_mtimes_ns")  # both or neither (older files)


class MiningFileError(PRGSError, ValueError):
    """A hard-negative file that is missing, malformed or made for another dataset; the message says how to rebuild."""


class MiningError(PRGSError, ValueError):
    """Mining settings the training split cannot satisfy (e.g. more negatives than it has); the message says which."""


# ----------------------------------------------------------------------------------------------------------------
# The offline hard-negative file


def fingerprint_lines(lines: list[str]) -> str:
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()


def dataset_fingerprints(index: PlaceIndex) -> dict[str, str]:
    """sha1 of the query and database path lists: a file mined for other images (or another order) is stale."""
    return {
        "queries_sha1": fingerprint_lines(index.queries_paths),
        "database_sha1": fingerprint_lines(index.database_paths),
    }


def image_file_stats(index: PlaceIndex) -> dict[str, np.ndarray]:
    """Size (bytes) and modification time (ns) of every image of the split, in index order: an image replaced in
    place (same path) changes them, which the path fingerprints cannot see."""
    paths = index.absolute_paths()
    with ThreadPoolExecutor(max_workers=16) as pool:  # stat() waits on the disk, not the CPU
        stats = list(pool.map(os.stat, paths, chunksize=256))
    return {
        "image_sizes": np.array([stat.st_size for stat in stats], dtype=np.int64),
        "image_mtimes_ns": np.array([stat.st_mtime_ns for stat in stats], dtype=np.int64),
    }


def hard_negatives_from_descriptors(
    database: np.ndarray,
    queries: np.ndarray,
    soft_positives: list[np.ndarray],
    num_negatives: int,
    chunk_size: int = 1024,
) -> np.ndarray:
    """(Nq, num_negatives) int64: per query the most similar database images that are not soft positives, in
    similarity order, padded with -1. Queries are processed in chunks, so memory stays bounded."""
    result = np.full((len(queries), num_negatives), -1, dtype=np.int64)
    for start in tqdm(range(0, len(queries), chunk_size), desc="hard negatives", unit="chunk", leave=False):
        stop = min(start + chunk_size, len(queries))
        most_positives = max((len(soft_positives[q]) for q in range(start, stop)), default=0)
        k = min(len(database), num_negatives + most_positives)
        _, neighbours = exact_knn(database, queries[start:stop], k)
        for row, query in enumerate(range(start, stop)):
            negatives = neighbours[row][~np.isin(neighbours[row], soft_positives[query])][:num_negatives]
            result[query, : len(negatives)] = negatives
    return result


def save_hard_negatives(
    path: str | Path, hard_negatives: np.ndarray, metadata: dict, image_stats: dict[str, np.ndarray] | None = None
) -> None:
    """Write the .npz atomically (temporary file, then rename), with the images' sizes and modification times
    (image_file_stats) when given."""
    metadata = {
        "format": HARD_NEGATIVES_FORMAT,
        "version": HARD_NEGATIVES_VERSION,
        "created": datetime.now().isoformat(timespec="seconds"),
        **metadata,
    }
    atomic_write(
        path,
        lambda file: np.savez(
            file,
            hard_negatives=hard_negatives.astype(np.int64),
            metadata=np.array(json.dumps(metadata)),
            **(image_stats or {}),
        ),
    )


def load_hard_negatives(
    path: str | Path, index: PlaceIndex, min_columns: int, rebuild_hint: str
) -> tuple[np.ndarray, dict]:
    """The hard-negative list for training split ``index``; MiningFileError (with ``rebuild_hint``) when the file
    is missing, malformed (HARD_NEGATIVES_FIELDS), made for other images, or has fewer than ``min_columns`` columns."""
    hard_negatives, metadata, image_stats = read_hard_negative_file(Path(path), rebuild_hint)
    if metadata.get("format") != HARD_NEGATIVES_FORMAT or metadata.get("version") != HARD_NEGATIVES_VERSION:
        raise MiningFileError(
            f"{path} is not a {HARD_NEGATIVES_FORMAT} v{HARD_NEGATIVES_VERSION} file (found "
            f"{metadata.get('format')} v{metadata.get('version')}). Rebuild it with: {rebuild_hint}"
        )
    expected = dataset_fingerprints(index)
    stale = [k for k, v in expected.items() if metadata.get(k) != v]
    if stale or hard_negatives.shape[0] != index.queries_num:
        raise MiningFileError(
            f"hard-negative file {path} was mined for another dataset ({metadata.get('dataset')}, "
            f"{hard_negatives.shape[0]} queries) than the training split {index.summary()}: "
            f"{', '.join(stale) or 'size'} differ. Rebuild it with: {rebuild_hint}"
        )
    if hard_negatives.shape[1] < min_columns:
        raise MiningFileError(
            f"{path} holds {hard_negatives.shape[1]} negatives per query but --neg_hardness asks "
            f"for {min_columns}. Rebuild it with a larger --num_hard_negatives: {rebuild_hint}"
        )
    if hard_negatives.size and (hard_negatives.min() < -1 or hard_negatives.max() >= index.database_num):
        raise MiningFileError(f"{path} holds indices outside [-1, {index.database_num}). Rebuild it: {rebuild_hint}")
    check_images_unchanged(Path(path), index, image_stats, rebuild_hint)
    return hard_negatives.astype(np.int64), metadata


def read_hard_negative_file(path: Path, rebuild_hint: str) -> tuple[np.ndarray, dict, dict[str, np.ndarray]]:
    """(hard_negatives (Nq, columns), metadata, image stats) of a file that follows HARD_NEGATIVES_FIELDS, else
    MiningFileError naming the file and the field, with ``rebuild_hint``."""
    if path.is_dir():
        raise MiningFileError(f"hard-negative file {path} is a folder; expected the .npz pre_compute_mining.py wrote")
    if not path.is_file():
        raise MiningFileError(f"hard-negative file {path} not found. Build it with: {rebuild_hint}")
    try:
        with open(path, "rb") as file:
            loaded = np.load(file, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                raise MiningFileError(
                    f"{path} is a bare .npy array {loaded.shape}, the reference's hard-negative list "
                    f"(<dataset>_v2_<backbone>_hard_final_distance.npy): it does not record which images it was "
                    f"mined for, so training cannot check it against the split. Mine this project's .npz instead "
                    f"with: {rebuild_hint}"
                )
            arrays = {name: loaded[name] for name in loaded.files}
    except MiningFileError:
        raise
    except Exception as error:
        raise MiningFileError(
            f"cannot read hard-negative file {path} ({error}). Rebuild it with: {rebuild_hint}"
        ) from error
    check_fields(path, arrays, HARD_NEGATIVES_FIELDS, error=MiningFileError, hint=f"Rebuild it with: {rebuild_hint}")
    try:
        metadata = json.loads(str(arrays["metadata"]))
    except ValueError as error:
        raise MiningFileError(
            f"{path}: field 'metadata' is not JSON ({error}). Rebuild it with: {rebuild_hint}"
        ) from error
    if not isinstance(metadata, dict):
        raise MiningFileError(
            f"{path}: field 'metadata' holds a JSON {type(metadata).__name__}, expected an object. "
            f"Rebuild it with: {rebuild_hint}"
        )
    image_stats = {name: arrays[name] for name in IMAGE_STAT_FIELDS if name in arrays}
    if len(image_stats) == 1:
        missing = next(name for name in IMAGE_STAT_FIELDS if name not in image_stats)
        raise MiningFileError(f"{path}: field '{missing}' is missing. Rebuild it with: {rebuild_hint}")
    return arrays["hard_negatives"], metadata, image_stats


def check_images_unchanged(path: Path, index: PlaceIndex, mined: dict[str, np.ndarray], rebuild_hint: str) -> None:
    """MiningFileError naming the images whose size changed since the file was mined (replaced in place); a
    warning naming those with another modification time only (touched, or copied without their times)."""
    if "image_sizes" not in mined:
        logger.warning(
            "%s records no image sizes (made by an older version): images replaced in place since cannot be noticed",
            path,
        )
        return
    paths = index.database_paths + index.queries_paths
    if len(mined["image_sizes"]) != len(paths):
        raise MiningFileError(
            f"{path}: field 'image_sizes' has {len(mined['image_sizes'])} entries, expected one per image of the "
            f"split ({len(paths)}). Rebuild it with: {rebuild_hint}"
        )
    now = image_file_stats(index)
    resized = np.flatnonzero(now["image_sizes"] != mined["image_sizes"])
    if len(resized):
        shown = ", ".join(paths[i] for i in resized[:5])
        raise MiningFileError(
            f"{len(resized)} images changed since {path} was mined (same path, another size), e.g. {shown}: its "
            f"negatives are stale. Rebuild it with: {rebuild_hint}"
        )
    touched = np.flatnonzero(now["image_mtimes_ns"] != mined["image_mtimes_ns"])
    if len(touched):
        logger.warning(
            "%d images have another modification time than when %s was mined (same size), e.g. %s: if they were "
            "edited, rebuild the file (%s); if they were only copied, ignore this",
            len(touched),
            path,
            ", ".join(paths[i] for i in touched[:5]),
            rebuild_hint,
        )


# ----------------------------------------------------------------------------------------------------------------
# Online mining of training tuples


@dataclass
class Tuples:
    """One mining round: queries (R,) query indices, positives (R,) and negatives (R, negs) database indices."""

    queries: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray

    def state(self) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(getattr(self, name)) for name in ("queries", "positives", "negatives")}

    @classmethod
    def from_state(cls, state: dict) -> Tuples:
        return cls(*(state[name].numpy() for name in ("queries", "positives", "negatives")))


class TupleMiner:
    """Builds each round's tuples; caches descriptors while the global model cannot change (frozen backbone)."""

    def __init__(
        self,
        index: PlaceIndex,
        mode: str,
        negs_num_per_query: int,
        neg_hardness: int = 100,
        neg_samples_num: int = 1000,
        hard_negatives: np.ndarray | None = None,
    ):
        if mode not in MINING_MODES:
            raise ValueError(f"mining mode must be one of {MINING_MODES}, got {mode!r}")
        if index.hard_positives_per_query is None or index.soft_positives_per_query is None:
            raise ValueError(f"{index.summary()} has no hard/soft positives: mining needs a training split")
        if index.queries_num == 0:
            raise MiningError(
                f"the training split {index.summary()} has no query with a positive (a database image within "
                f"--train_positives_dist_threshold): nothing to train on. Check the UTM coordinates of its images "
                f"or the threshold"
            )
        if mode == "global" and hard_negatives is None:
            raise ValueError("mining 'global' needs the hard-negative file (--hard_negatives)")
        available = index.database_num - max(len(p) for p in index.soft_positives_per_query)
        if negs_num_per_query > available:
            raise MiningError(
                f"--negs_num_per_query {negs_num_per_query} is more than the training split {index.summary()} "
                f"can give: some query has only {available} database images that are not its positives. "
                + (f"Use --negs_num_per_query {available} or fewer" if available > 0 else "Add database images")
            )
        self.index, self.mode, self.negs_num_per_query = index, mode, negs_num_per_query
        self.neg_hardness, self.neg_samples_num, self.hard_negatives = neg_hardness, neg_samples_num, hard_negatives
        self.previous_negatives: dict[int, np.ndarray] = {}
        self.cached_descriptors: dict[int, np.ndarray] = {}

    def mine(
        self,
        queries: np.ndarray,
        rng: np.random.Generator,
        global_descriptors_of: Callable[[np.ndarray], np.ndarray],
        global_model_frozen: bool,
    ) -> Tuples:
        """Tuples for ``queries`` (query indices). global_descriptors_of(image_ids) -> descriptors (n, D) of those
        images (global indices)."""
        index = self.index
        if not global_model_frozen:
            self.cached_descriptors.clear()
        sampled_database = np.empty(0, dtype=np.int64)
        if self.mode in ("partial", "full"):
            count = min(self.neg_samples_num, index.database_num)
            sampled_database = np.sort(rng.choice(index.database_num, count, replace=False))
        needed = {int(index.database_num + q) for q in queries}
        needed.update(int(p) for q in queries for p in index.hard_positives_per_query[q])
        if self.mode in ("partial", "full"):
            needed.update(int(d) for d in sampled_database)
        if self.mode == "full":
            needed.update(int(d) for q in queries for d in self.previous_negatives.get(int(q), ()))
        self._add_missing_descriptors(sorted(needed), global_descriptors_of)

        positives = np.array([self._best_positive(q) for q in queries], dtype=np.int64)
        negatives = np.stack([self._negatives(q, rng, sampled_database) for q in queries])
        if self.mode == "full":
            self.previous_negatives.update({int(q): n for q, n in zip(queries, negatives)})
        return Tuples(np.asarray(queries, dtype=np.int64), positives, negatives)

    def _add_missing_descriptors(
        self, image_ids: list[int], global_descriptors_of: Callable[[np.ndarray], np.ndarray]
    ) -> None:
        missing = np.array([i for i in image_ids if i not in self.cached_descriptors], dtype=np.int64)
        if len(missing):
            for image_id, descriptor in zip(missing, global_descriptors_of(missing)):
                self.cached_descriptors[int(image_id)] = descriptor

    def _descriptors(self, image_ids) -> np.ndarray:
        return np.stack([self.cached_descriptors[int(i)] for i in image_ids])

    def _best_positive(self, query: int) -> int:
        """The hard positive nearest to the query in descriptor space."""
        candidates = self.index.hard_positives_per_query[query]
        query_descriptor = self.cached_descriptors[self.index.database_num + int(query)]
        distances = ((self._descriptors(candidates) - query_descriptor) ** 2).sum(1)
        return int(candidates[np.argmin(distances)])

    def _negatives(self, query: int, rng: np.random.Generator, sampled_database: np.ndarray) -> np.ndarray:
        count = self.negs_num_per_query
        soft_positives = self.index.soft_positives_per_query[query]
        if self.mode == "global":
            pool = self.hard_negatives[query, : self.neg_hardness]
            pool = pool[(pool >= 0) & ~np.isin(pool, soft_positives)]
            if len(pool) >= count:
                return rng.choice(pool, count, replace=False)
            # too few listed negatives (short, padded row): top up with random non-positives
            return np.concatenate([pool, self._random_negatives(query, rng, count - len(pool), exclude=pool)])
        if self.mode == "random":
            return self._random_negatives(query, rng, count)
        pool = sampled_database
        if self.mode == "full":
            pool = np.union1d(pool, self.previous_negatives.get(int(query), np.empty(0, dtype=np.int64)))
        pool = pool[~np.isin(pool, soft_positives)]
        query_descriptor = self.cached_descriptors[self.index.database_num + int(query)]
        distances = ((self._descriptors(pool) - query_descriptor) ** 2).sum(1) if len(pool) else np.empty(0)
        hardest = pool[np.argsort(distances, kind="stable")[:count]]
        if len(hardest) < count:  # fewer sampled non-positives than negatives asked for: top up at random
            hardest = np.concatenate([hardest, self._random_negatives(query, rng, count - len(hardest), hardest)])
        return hardest

    def _random_negatives(
        self, query: int, rng: np.random.Generator, count: int, exclude: np.ndarray | None = None
    ) -> np.ndarray:
        forbidden = self.index.soft_positives_per_query[query]
        if exclude is not None:
            forbidden = np.union1d(forbidden, exclude)
        allowed = np.setdiff1d(np.arange(self.index.database_num), forbidden)
        return rng.choice(allowed, count, replace=False)
