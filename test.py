"""Evaluate PRGS on one split: extract, retrieve the top candidates with faiss, rerank them, report recall@N.

    python3 test.py                       # the built-in toy world (generated on first use)
    python3 test.py --dataset_name msls --split val --datasets_folder /data --resume resume/msls_train_prgs.pt
    python3 test.py --database_folder my/database --queries_folder my/queries --resume best.pth   # your photos

Outputs go to logs/<save_dir>/<timestamp>/ (docs/outputs.md): info.log, debug.log, results.json, predictions.csv,
with --num_preds_to_save pictures of the predictions, and with --rerank_pictures pictures of the reranking.
`torchrun --nproc_per_node N test.py ...` shares the work among N processes (docs/distributed.md).
"""

from __future__ import annotations

import logging

import distributed
import runs
import util
from config import model_options, split_options
from datasets_ws import load_split
from evaluation import (
    build_results,
    eval_settings,
    evaluate,
    pictured_queries,
    recalls_table,
    save_rerank_pictures,
    write_outputs,
)
from model.checkpoint import build_model
from parser import parse_test_args
from places.folders import FOLDERS_NAME
from retrieval import faiss_uses_gpu

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict:
    args = parse_test_args(argv)
    with runs.start_run(args) as run:
        index = load_split(args.datasets_folder, args.dataset_name, args.split, **split_options(args))
        if index.queries_num == 0:
            raise util.PRGSError(f"{index.summary()} has no queries to evaluate")
        model, checkpoint = build_model(args.model_config, **model_options(args))
        if checkpoint is None:
            logger.warning(
                "no --resume checkpoint: local_head and the reranker are untrained, so reranked recalls are "
                "those of a random reranker"
            )
        model = model.to(run.device)
        logger.info(
            "model: %s, input %dx%d, %d nodes kept per image, %s preprocessing; device %s%s",
            model.config.backbone,
            *args.resize,
            model.config.num_kept_nodes,
            args.preprocessing,
            run.device,
            " (faiss on GPU)" if faiss_uses_gpu(run.device) else "",
        )
        settings = eval_settings(args, run.device)
        evaluation = evaluate(model, index, settings, run.scratch_folder())
        split = None if args.dataset_name == FOLDERS_NAME else args.split
        results = build_results(args, split, index, model, checkpoint, evaluation, run.device, run.seconds())
        if distributed.is_main():
            write_outputs(args, run.folder, index, evaluation, results)
            _save_rerank_pictures(args, run, model, index, evaluation, settings)
            logger.info("%s\n%s", index.summary(), recalls_table(evaluation))
            logger.info("results: %s", run.folder / "results.json")
    return results


def _save_rerank_pictures(args, run, model, index, evaluation, settings) -> None:
    """With --rerank_pictures K: what the cross graphs matched for the reranked top-K of the pictured queries."""
    if args.rerank_pictures > 0:
        queries = pictured_queries(index, evaluation, args.num_queries_to_save, args.save_only_wrong_preds)
        saved = save_rerank_pictures(
            run.folder / "reranking", model, index, evaluation, settings, queries, args.rerank_pictures
        )
        logger.info("saved %d reranking pictures in %s", saved, run.folder / "reranking")


if __name__ == "__main__":
    runs.run_entry_point(main)
