"""Global retrieval, where the shortlist comes from: PRGS's own global descriptors, another global model's
(``ShortlistSource.retriever``, retrievers.py) or a file of candidates made by another tool (candidates.py); faiss
search of the descriptors (exact L2, or an approximate index from an index-factory string), on every visible GPU
with faiss-gpu. Under torchrun rank 0 searches and every rank receives the result (global_retrieval)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import torch

import distributed
from candidates import read_candidates
from config import EvalSettings, ShortlistSettings
from places.index import PlaceIndex
from retrievers import OWN_MODEL, GlobalModelSpec, GlobalRetriever
from util import PRGSError, file_sha1

logger = logging.getLogger(__name__)


class RetrievalError(PRGSError, ValueError):
    """A --faiss_index that faiss cannot build, train or search as asked."""


@dataclass
class ShortlistSource:
    """Where an evaluation's shortlist comes from, ready to use: PRGS's own global descriptors (both None), a loaded
    global model in front of the reranker (``retriever``), or a file of ranked candidates (``candidates``)."""

    retriever: GlobalRetriever | None = None
    candidates: Path | None = None
    _record: dict | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(cls, settings: ShortlistSettings, device: torch.device, precision: str = "fp32") -> ShortlistSource:
        """The source ShortlistSettings name, its global model loaded on ``device`` (nothing downloaded)."""
        spec = settings.global_model
        retriever = None if spec is None else GlobalRetriever.from_spec(spec, device, precision)
        return cls(retriever, settings.candidates)

    def record(self) -> dict:
        """What results.json records of the source: the global model's spec with the SHA-1 of its weights file (and
        of any file its keyword arguments name), or the candidates file with its SHA-1 (hashed once per source)."""
        if self._record is None:
            if self.candidates is not None:
                self._record = {"candidates": str(self.candidates), "candidates_sha1": file_sha1(self.candidates)}
            elif self.retriever is None:
                self._record = {"global_model": OWN_MODEL}
            else:
                self._record = {"global_model": spec_record(self.retriever.spec)}
        return dict(self._record)


def spec_record(spec: GlobalModelSpec) -> dict:
    """A GlobalModelSpec as JSON-ready values, with the SHA-1 of the weights file and of each keyword argument that
    names a file (e.g. a checkpoint the entry loads itself)."""
    record = {
        k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in asdict(spec).items()
    }
    record["weights_sha1"] = file_sha1(spec.weights) if spec.weights is not None else None
    files = {k: v for k, v in spec.kwargs.items() if isinstance(v, str) and Path(v).expanduser().is_file()}
    record["kwargs_files_sha1"] = {k: file_sha1(Path(v).expanduser()) for k, v in files.items()}
    return record


def candidates_retrieval(path: Path, index: PlaceIndex, top: int) -> tuple[np.ndarray, np.ndarray, None, dict]:
    """The shortlist of every query from the file ``path`` (candidates.read_candidates, each row at least ``top``
    long): (squared distances, all NaN since the file has none; predictions (Nq, K)), no exact predictions, and a
    report as global_retrieval's."""
    start = time.perf_counter()
    predictions = read_candidates(path, index, min_candidates=top)
    ms_per_query = 1000 * (time.perf_counter() - start) / max(1, index.queries_num)
    distances = np.full(predictions.shape, np.nan, dtype=np.float32)
    return distances, predictions, None, {"index": "candidates file", "faiss_gpu": False, "ms_per_query": ms_per_query}


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
