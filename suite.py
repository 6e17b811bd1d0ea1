"""One configuration on several datasets in one run (test.py --datasets, docs/benchmarks.md): each split evaluated
as test.py evaluates one, its outputs in a folder of its own, then the table papers print: R@1/5/10 of the global
and the reranked order per dataset and their mean, with the time per query of each stage and the memory; written to
results.json (per dataset and the mean) and benchmark.md in the run folder."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

import distributed
import runs
from config import DatasetSplit, EvalSettings, output_options, parse_datasets
from datasets_ws import load_split, split_request
from evaluation import Evaluation, evaluate
from model.checkpoint import LoadedCheckpoint
from model.network import PRGSNetwork
from outputs import build_results, write_outputs
from retrieval import ShortlistSource
from util import atomic_write_text

logger = logging.getLogger(__name__)

TABLE_RECALLS = (1, 5, 10)  # the columns papers print, those of --recall_values


@dataclass
class SuiteModel:
    """What every dataset of the suite is evaluated with: the network, its checkpoint, the evaluation settings and
    the shortlist's source."""

    model: PRGSNetwork
    checkpoint: LoadedCheckpoint | None
    settings: EvalSettings
    source: ShortlistSource


def evaluate_datasets(args, suite: SuiteModel, run: runs.Run) -> dict:
    """Every NAME:SPLIT of --datasets evaluated with ``suite``; each split's test.py outputs in
    <run folder>/<name>_<split>/. Returns the suite's results.json content (written by rank 0 with benchmark.md):
    per dataset its recalls, time per query of each stage and memory, and the mean recalls."""
    per_dataset = {}
    for item in parse_datasets(args.datasets):
        per_dataset[f"{item.dataset_name}:{item.split}"] = _evaluate_one(args, item, suite, run)
    results = {
        "datasets": per_dataset,
        "mean": mean_recalls(per_dataset),
        "shortlist": suite.source.record(),
        "model": suite.model.config.to_dict(),
        "checkpoint": None if suite.checkpoint is None else str(suite.checkpoint.path),
        "total_seconds": round(run.seconds(), 2),
        "configuration": runs.plain_args(args),
    }
    table = benchmark_table(results)
    if distributed.is_main():
        atomic_write_text(run.folder / "benchmark.md", table + "\n")
        atomic_write_text(run.folder / "results.json", json.dumps(results, indent=2))
        logger.info("one configuration, %d datasets:\n%s", len(per_dataset), table)
        logger.info("results: %s and %s", run.folder / "results.json", run.folder / "benchmark.md")
    return results


def _evaluate_one(args, item: DatasetSplit, suite: SuiteModel, run: runs.Run) -> dict:
    """One split of the suite, evaluated and written as test.py does it (in its own folder); its summary row."""
    index = load_split(replace(split_request(args, item.split), dataset_name=item.dataset_name))
    if suite.settings.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(suite.settings.device)  # each dataset's own GPU peak
    evaluation = evaluate(suite.model, index, suite.settings, run.scratch_folder(), source=suite.source)
    options = replace(output_options(args), dataset_name=item.dataset_name)
    results = build_results(
        evaluation,
        index,
        item.split,
        options,
        model=suite.model,
        checkpoint=suite.checkpoint,
        device=suite.settings.device,
        seconds=run.seconds(),
        configuration=runs.plain_args(args),
    )
    if distributed.is_main():
        write_outputs(suite_folder(run.folder, item), index, evaluation, results, options)
    return dataset_summary(evaluation, results)


def dataset_summary(evaluation: Evaluation, results: dict) -> dict:
    """One dataset's row: its size, recalls, milliseconds per query of each stage (the query's extraction, the
    search, the reranking, and their sum) and memory (the process's peaks, the store's bytes per image)."""
    timings = evaluation.timings
    stages = {
        "extraction": timings.get("extraction_ms_per_image_queries", 0.0),
        "search": timings.get("retrieval_ms_per_query", 0.0),
        "rerank": timings.get("rerank_ms_per_query", 0.0),
    }
    stages["total"] = sum(stages.values())
    return {
        "root": results["dataset"]["root"],
        "queries_num": results["dataset"]["queries_num"],
        "database_num": results["dataset"]["database_num"],
        "recalls": results["recalls"],
        "ms_per_query": {stage: round(ms, 3) for stage, ms in stages.items()},
        "memory": {**results["memory"], "store_bytes_per_image": evaluation.store_bytes_per_image},
    }


def mean_recalls(per_dataset: dict[str, dict]) -> dict | None:
    """The mean of each recall over the datasets with ground truth ({"global": {"R@N": ...}, "reranked": ...}),
    None when none has. A reranked R@N past --rerank_top is None in a split's results (outputs.py), and so is its
    mean."""
    scored = [row["recalls"] for row in per_dataset.values() if row["recalls"]["global"] is not None]
    if not scored:
        return None

    def mean(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else round(float(np.mean(values)), 4)

    return {
        ranking: {name: mean([r[ranking][name] for r in scored]) for name in scored[0][ranking]}
        for ranking in ("global", "reranked")
    }


def benchmark_table(results: dict) -> str:
    """The Markdown table of the suite: per dataset (and their mean) R@1/5/10 global and reranked, milliseconds per
    query of each stage, the peak memory and the store's bytes per image."""
    recalls = [f"R@{n}" for n in TABLE_RECALLS if any(f"R@{n}" in _names(row) for row in results["datasets"].values())]
    header = ["dataset", "queries", *(f"global {r}" for r in recalls), *(f"reranked {r}" for r in recalls)]
    header += [
        "extract ms/q",
        "search ms/q",
        "rerank ms/q",
        "total ms/q",
        "peak RAM MiB",
        "peak GPU MiB",
        "store B/img",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in results["datasets"].items():
        cells = [name, str(row["queries_num"]), *_recall_cells(row["recalls"], recalls)]
        cells += [f"{row['ms_per_query'][s]:.2f}" for s in ("extraction", "search", "rerank", "total")]
        memory = row["memory"]
        cells += [f"{memory['peak_host_rss_mb']:.0f}", _optional(memory.get("peak_gpu_allocated_mb"))]
        cells.append(str(memory["store_bytes_per_image"]))
        lines.append("| " + " | ".join(cells) + " |")
    if results["mean"] is not None:
        cells = ["mean", "", *_recall_cells(results["mean"], recalls)] + [""] * 7
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _names(row: dict) -> set[str]:
    return set(row["recalls"]["global"] or {})


def _recall_cells(recalls: dict, names: list[str]) -> list[str]:
    """Global then reranked cells of ``names``; '-' where a split has no ground truth or a reranked R@N lies past
    --rerank_top."""
    return [
        "-" if recalls[ranking] is None or recalls[ranking].get(name) is None else f"{recalls[ranking][name]:.2f}"
        for ranking in ("global", "reranked")
        for name in names
    ]


def _optional(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def suite_folder(run_folder: Path, item: DatasetSplit) -> Path:
    """Where one split's outputs go in the suite's run folder."""
    return run_folder / f"{item.dataset_name}_{item.split}"
