"""Evaluate PRGS on one split: extract, retrieve the top candidates with faiss, rerank them, report recall@N.

    python3 test.py                       # the built-in toy world (generated on first use)
    python3 test.py --dataset_name msls --split val --datasets_folder /data --resume resume/msls_train_prgs.pt
    python3 test.py --database_folder my/database --queries_folder my/queries --resume best.pth   # your photos
    python3 test.py --datasets toy_world:val,toy_world:test --resume best.pth    # one table, several datasets
    python3 test.py --resume best.pth --global_model FOLDER:ENTRY     # another model's shortlist, reranked
    python3 test.py --resume best.pth --candidates predictions.csv    # a shortlist made by another tool, reranked

Outputs go to logs/<save_dir>/<timestamp>/ (docs/outputs.md): info.log, debug.log, results.json, predictions.csv,
with --num_preds_to_save pictures of the predictions, with --rerank_pictures pictures of the reranking, and with
either (or --report always) report.html, a page of the queries reranking fixed and broke.
With --datasets each split's outputs go to a folder of its own, beside benchmark.md and the suite's
results.json (docs/benchmarks.md). Where the shortlist comes from: docs/retrievers.md.
`torchrun --nproc_per_node N test.py ...` shares the work among N processes (docs/distributed.md).
"""

from __future__ import annotations

import logging

import torch

import distributed
import runs
import util
from config import eval_settings, forward_precision, model_options, output_options, shortlist_settings
from datasets_ws import load_split, split_request
from evaluation import evaluate
from model.checkpoint import LoadedCheckpoint, build_model
from model.network import PRGSNetwork
from outputs import build_results, summary_text, write_outputs
from parser import parse_test_args
from places.folders import FOLDERS_NAME
from places.index import PlaceIndex
from retrieval import ShortlistSource, faiss_uses_gpu
from suite import SuiteModel, evaluate_datasets

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict:
    """test.py's flags (parser.test_parser) -> results.json's content (docs/outputs.md), written in the run folder."""
    args = parse_test_args(argv)
    with runs.start_run(args) as run:
        index = load_test_split(args) if args.datasets is None else None
        model, checkpoint = load_model(args, run.device)
        settings = eval_settings(args, run.device)
        source = ShortlistSource.open(shortlist_settings(args), run.device, forward_precision(args, run.device))
        if index is None:
            return evaluate_datasets(args, SuiteModel(model, checkpoint, settings, source), run)
        evaluation = evaluate(model, index, settings, run.scratch_folder(), source=source)
        options = output_options(args)
        split = None if args.dataset_name == FOLDERS_NAME else args.split
        results = build_results(
            evaluation,
            index,
            split,
            options,
            model=model,
            checkpoint=checkpoint,
            device=run.device,
            seconds=run.seconds(),
            configuration=runs.plain_args(args),
        )
        if distributed.is_main():
            write_outputs(run.folder, index, evaluation, results, options, model=model, settings=settings)
            logger.info("%s", summary_text(index, evaluation, results))
            logger.info("results: %s", run.folder / "results.json")
    return results


def load_test_split(args) -> PlaceIndex:
    """The split to evaluate (a dataset's split or two folders of photos); refused when it has no queries."""
    index = load_split(split_request(args, args.split))
    if index.queries_num == 0:
        raise util.PRGSError(f"{index.summary()} has no queries to evaluate")
    return index


def load_model(args, device: torch.device) -> tuple[PRGSNetwork, LoadedCheckpoint | None]:
    """The network from --resume (or untrained, with a warning) on ``device``, and its checkpoint."""
    model, checkpoint = build_model(args.model_config, **model_options(args))
    if checkpoint is None:
        logger.warning(
            "no --resume checkpoint: local_head and the reranker are untrained, so reranked recalls are "
            "those of a random reranker"
        )
    model = model.to(device)
    logger.info(
        "model: %s, input %dx%d, %d nodes kept per image, %s preprocessing; device %s%s",
        model.config.backbone,
        *args.resize,
        model.config.num_kept_nodes,
        args.preprocessing,
        device,
        " (faiss on GPU)" if faiss_uses_gpu(device) else "",
    )
    return model, checkpoint


if __name__ == "__main__":
    runs.run_entry_point(main)
