"""The report of a training run: the test split's recalls before training, the best model's test with test.py's
outputs, the reranker's margins with their confidence intervals, the before/after table, the training curves, and
results.json (docs/outputs.md)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

import distributed
import runs
import util
from config import output_options
from evaluation import Evaluation
from metrics import first_correct_rank, paired_bootstrap
from model.checkpoint import LoadedCheckpoint
from model.network import PRGSNetwork
from outputs import build_results, recalls_by_name, recalls_table, write_outputs
from places.index import PlaceIndex
from training_state import TrainingState
from visualize import save_training_curves

logger = logging.getLogger(__name__)


class TrainingReport:
    """results.json of a training run as it fills: the stage and splits, the test before training, the best model's
    test and margins, then the run's summary. ``folder``: the run folder (rank 0 alone writes into it)."""

    def __init__(self, args, datasets: dict[str, str], test: PlaceIndex, with_rerank: bool, folder: Path):
        self.args, self.test, self.with_rerank, self.folder = args, test, with_rerank, folder
        self.hits_before: dict[str, np.ndarray] | None = None  # per test query, from --test_before_training
        self.results: dict = {"stage": args.train_stage, "datasets": datasets}

    def before_training(self, before: Evaluation) -> None:
        """Record the test split's evaluation ``before`` any step (--test_before_training)."""
        self.results["test_before_training"] = recalls_by_name(before)
        self.hits_before = test_hits(before, self.test, self.args.recall_values[0], self.with_rerank)
        logger.info("test before training (%s):\n%s", self.test.summary(), recalls_table(before))

    def no_best_checkpoint(self, best_epoch: int) -> None:
        """Record that the best epoch's best.pth is missing (a resume that could not take it along): no final test."""
        logger.warning(
            "no best.pth of the best epoch (%d) in %s (see the warning at the resume): no final test",
            best_epoch,
            self.folder,
        )
        self.results["test"] = None

    def best_tested(
        self,
        after: Evaluation,
        model: PRGSNetwork,
        best: LoadedCheckpoint,
        device,
        seconds: float,
        best_epoch: int,
    ) -> None:
        """Record the test of the best model (``after``, which took ``seconds``, of ``best``'s weights in ``model``),
        its margins over the test before training, and write test.py's outputs into <run>/test/."""
        args = self.args
        self.results["test"] = recalls_by_name(after)
        self.results["resolved"] = after.resolved  # what the test ran where a flag said "auto"
        hits_after = test_hits(after, self.test, args.recall_values[0], self.with_rerank)
        if hits_after is not None and self.hits_before is not None:
            self.results["test_margins"] = test_margins(self.hits_before, hits_after, args.recall_values[0])
        options = output_options(args)
        test_results = build_results(
            after,
            self.test,
            args.test_split,
            options,
            model=model,
            checkpoint=best,
            device=device,
            seconds=seconds,
            configuration=runs.plain_args(args),
        )
        if distributed.is_main():
            write_outputs(self.folder / "test", self.test, after, test_results, options)
        logger.info(
            "test of the best model (epoch %d) on %s:\n%s", best_epoch, self.test.summary(), recalls_table(after)
        )
        if "test_before_training" in self.results:
            logger.info(before_after_table(self.results, args.recall_values))

    def write(self, stopped: str, state: TrainingState, model: PRGSNetwork, throughput: dict, seconds: float) -> dict:
        """results.json in the run folder (written by rank 0) once training ``stopped``; returns it."""
        args = self.args
        key = f"val_{'reranked' if self.with_rerank else 'global'}_R@{args.recall_values[0]}"
        self.results.update(
            {
                "stopped": stopped,
                "epochs_trained": state.epoch,
                "global_step": state.global_step,
                "best": {"epoch": state.best_epoch, key: state.best_metric},
                "history": state.history,
                "checkpoints": {
                    "last": str(self.folder / "last.pth"),
                    "best": str(self.folder / "best.pth") if (self.folder / "best.pth").is_file() else None,
                },
                "throughput": throughput,
                "seconds": round(seconds, 1),
                "model": model.config.to_dict(),
                "configuration": runs.plain_args(args),
            }
        )
        if distributed.is_main():
            util.atomic_write_text(self.folder / "results.json", json.dumps(self.results, indent=2))
            logger.info("results: %s", self.folder / "results.json")
        return self.results


def test_hits(evaluation: Evaluation, test: PlaceIndex, n: int, with_rerank: bool) -> dict[str, np.ndarray] | None:
    """Per test query, whether global / reranked retrieval has a positive in its first ``n``, or None without ground
    truth or without a reranker (the global stage)."""
    positives = test.soft_positives_per_query
    if positives is None or not with_rerank:
        return None
    return {
        "global": first_correct_rank(evaluation.global_predictions, positives) < n,
        "reranked": first_correct_rank(evaluation.reranked_predictions, positives) < n,
    }


def test_margins(hits_before: dict[str, np.ndarray], hits_after: dict[str, np.ndarray], n: int) -> dict:
    """The R@N differences that say whether training the reranker paid off, each with its 95 % paired-bootstrap
    confidence interval over the test queries: {name: {"points": d, "ci95": [low, high]}} (docs/outputs.md)."""
    pairs = {
        f"reranked_minus_global_R@{n}": (hits_after["reranked"], hits_after["global"]),
        f"reranked_minus_global_before_training_R@{n}": (hits_before["reranked"], hits_before["global"]),
        f"trained_minus_untrained_reranker_R@{n}": (hits_after["reranked"], hits_before["reranked"]),
    }
    margins = {}
    for name, (hits_a, hits_b) in pairs.items():
        points, low, high = paired_bootstrap(hits_a, hits_b)
        margins[name] = {"points": round(points, 2), "ci95": [round(low, 2), round(high, 2)]}
    return margins


def before_after_table(results: dict, recall_values: list[int]) -> str:
    """The test split's R@N (smallest N) of global and reranked retrieval before and after training, with the
    reranker's margins and their 95 % confidence intervals when results has them."""
    n = recall_values[0]
    first = f"R@{n}"
    before, after = results["test_before_training"], results["test"]
    if before["global"] is None:
        return "no ground truth on the test split: no before/after table"
    margins = results.get("test_margins", {})
    lines = [f"{'test ' + first:32}{'global':>10}{'reranked':>10}   reranked - global, 95% CI"]
    for label, values, key in (
        ("before training", before, f"reranked_minus_global_before_training_R@{n}"),
        ("after training", after, f"reranked_minus_global_R@{n}"),
    ):
        line = f"{label:32}{values['global'][first]:10.2f}{values['reranked'][first]:10.2f}"
        if key in margins:
            line += f"   {_margin_text(margins[key])}"
        lines.append(line)
    key = f"trained_minus_untrained_reranker_R@{n}"
    if key in margins:
        queries = results["datasets"]["test"]
        lines.append(f"trained - untrained reranker: {_margin_text(margins[key])} ({queries}; paired bootstrap)")
    return "\n".join(lines)


def _margin_text(margin: dict) -> str:
    low, high = margin["ci95"]
    return f"{margin['points']:+.2f} [{low:+.2f}, {high:+.2f}]"


def save_curves(path: Path, history: list[dict], with_rerank: bool) -> None:
    """The loss and the first validation recall per epoch of ``history`` (TrainingState.history) as a picture."""
    first = next(iter(history[0]["val"]["global"]))
    recalls = {"global": [h["val"]["global"][first] for h in history]}
    if with_rerank:
        recalls["reranked"] = [h["val"]["reranked"][first] for h in history]
    save_training_curves(path, [h["epoch"] for h in history], [h["loss"] for h in history], recalls)
