"""Offline hard-negative mining: for every training query, the most similar database images that are not positives.

    python3 pre_compute_mining.py --dataset_name msls --datasets_folder /data --resume resume/msls_v2_deits.pth

Computes global descriptors of the training split with the given model (this project's checkpoint, or the
reference's global-only DeiT checkpoint; or, with --global_model, another retriever's: docs/retrievers.md, so that
the reranker trains on the negatives that retriever confuses), then writes result/<dataset_name>_hard_negatives.npz
(docs/hard_negatives.md) for train_reranking.py --mining global. Under torchrun the ranks share the descriptor
extraction and rank 0 mines and writes the file (docs/distributed.md).
"""

from __future__ import annotations

import logging

import numpy as np

import distributed
import runs
from config import forward_precision, model_options, shortlist_settings
from datasets_ws import load_split, split_request
from extraction import ExtractionSettings, global_descriptors
from mining import dataset_fingerprints, hard_negatives_from_descriptors, image_file_stats, save_hard_negatives
from model.checkpoint import build_model
from parser import parse_mining_args
from retrieval import ShortlistSource
from util import file_sha1

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> str:
    args = parse_mining_args(argv)
    with runs.start_run(args, output_files=[args.output]) as run:
        index = load_split(split_request(args, "train"))
        model, checkpoint = build_model(args.model_config, **model_options(args))
        source = ShortlistSource.open(shortlist_settings(args), run.device, forward_precision(args, run.device))
        if checkpoint is None and source.retriever is None:
            logger.warning("no --resume: mining with an untrained global model gives poor negatives")
        model = model.to(run.device)
        loop = ExtractionSettings(
            args.resize, run.device, args.infer_batch_size, args.num_workers, forward_precision(args, run.device),
            preprocessing=args.preprocessing,
        )  # fmt: skip
        descriptors = global_descriptors(model, index, np.arange(len(index)), loop, retriever=source.retriever)
        if not distributed.is_main():  # every rank extracts its share; rank 0 mines and writes
            return args.output
        hard_negatives = hard_negatives_from_descriptors(
            descriptors[: index.database_num],
            descriptors[index.database_num :],
            index.soft_positives_per_query,
            args.num_hard_negatives,
            args.chunk_size,
        )
        metadata = mining_metadata(args, index, model, source)
        save_hard_negatives(args.output, hard_negatives, metadata, image_file_stats(index))
        logger.info(
            "wrote %s: %d queries x %d negatives (%d padding entries) in %.0f s",
            args.output,
            *hard_negatives.shape,
            int((hard_negatives < 0).sum()),
            run.seconds(),
        )
    return args.output


def mining_metadata(args, index, model, source: ShortlistSource) -> dict:
    """What the hard-negative file records about how it was made (docs/hard_negatives.md)."""
    return {
        "dataset": index.name,
        "datasets_folder": str(args.datasets_folder),
        **dataset_fingerprints(index),
        "queries_num": index.queries_num,
        "database_num": index.database_num,
        "num_hard_negatives": args.num_hard_negatives,
        "positive_dist_threshold": args.val_positive_dist_threshold,
        "train_positives_dist_threshold": args.train_positives_dist_threshold,
        "model_checkpoint": args.resume,
        "model_checkpoint_sha1": file_sha1(args.resume) if args.resume else None,
        "model": model.config.to_dict(),
        "image_size": list(args.resize),
        "preprocessing": args.preprocessing,
        "global_model": source.record()["global_model"],
    }


if __name__ == "__main__":
    runs.run_entry_point(main)
