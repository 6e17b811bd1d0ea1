"""Reranking: each query's global shortlist re-sorted by the reranker's P(same place), read from the local-feature
store in batches of queries (the next batch read in the background), with the kernel's choice, an optional CUDA
graph per batch shape and the optional fusion with the global similarity. Under torchrun each rank reranks its
whole batches of queries (rerank_shared)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

import distributed
import util
from config import EvalSettings
from model.backbone import patch_grid
from model.network import PRGSNetwork
from model.reranker import RerankKernel, match_probability, rerank_kernel


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


def _scorer(model: PRGSNetwork, kernel: RerankKernel, settings: EvalSettings) -> Callable[[torch.Tensor], torch.Tensor]:
    """nodes (b, 1+K, L, C) -> P(same place) (b, K): the reranker with ``kernel``, under the autocast of
    settings.reranking_precision for the cdist kernels (the fused kernels fix their own precision), as a CUDA graph
    when asked."""
    grid = patch_grid(settings.image_size)
    precision = "fp32" if kernel.fused else settings.reranking_precision

    def score(nodes: torch.Tensor) -> torch.Tensor:
        with util.autocast(settings.device, precision):
            return match_probability(model.reranker(nodes, grid, kernel))

    if settings.rerank_cuda_graphs and settings.device.type == "cuda":
        return CudaGraphCache(score)
    return score


def fused_scores(probabilities: np.ndarray, squared_distances: np.ndarray, weight: float) -> np.ndarray:
    """(1 - w) * P(same place) + w * (1 + cos) / 2, with cos = 1 - d^2 / 2 for unit descriptors; w = 0 -> P."""
    if weight == 0.0:
        return probabilities
    cosine = 1.0 - squared_distances / 2.0
    return (1.0 - weight) * probabilities + weight * (1.0 + cosine) / 2.0


# ----------------------------------------------------------------------------------------------------------------
# CUDA graphs


class CudaGraphCache:
    """Replays a CUDA graph of ``function(x)`` captured once per input shape (at most ``max_graphs`` shapes; others
    run eagerly): one launch instead of one per operation, for fixed shapes. The first call for a shape warms up
    on a side stream (so that lazy set-up such as kernel tuning is not captured), then captures. The returned
    tensor is the graph's static output: valid until the next call, copy it to keep it."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], max_graphs: int = 2, warmup: int = 2):
        self.function, self.max_graphs, self.warmup = function, max_graphs, warmup
        self.graphs: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs or x.device.type != "cuda":
                return self.function(x)
            self.graphs[key] = self._capture(x)
        static_input, static_output, graph = self.graphs[key]
        static_input.copy_(x)
        graph.replay()
        return static_output

    def _capture(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]:
        static_input = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.function(static_input)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.function(static_input)
        return static_input, static_output, graph
