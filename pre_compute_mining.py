"""Offline hard-negative mining: for every training query, the most similar database images that are not positives.

    python pre_compute_mining.py --dataset_name msls --datasets_folder /data --resume resume/msls_v2_deits.pth

Computes global descriptors of the training split with the given model (this project's checkpoint, or the
reference's global-only DeiT checkpoint), then writes result/<dataset_name>_hard_negatives.npz: the top
--num_hard_negatives database indices per query (training query order), soft positives removed, padded with -1,
with metadata (dataset and model fingerprints, thresholds, date) that train_reranking.py checks. See mining.py.
"""
from __future__ import annotations

import logging
import time

import numpy as np

import parser as prgs_parser
import util
from datasets_ws import load_split
from mining import (compute_global_descriptors, dataset_fingerprints, file_sha1, hard_negatives_from_descriptors,
                    save_hard_negatives)

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> str:
    args = prgs_parser.parse_mining_args(argv)
    util.start_run(args)
    started = time.perf_counter()
    util.set_seed(args.seed)
    device = util.resolve_device(args.device)
    index = load_split(args.datasets_folder, args.dataset_name, "train",
                       positive_dist_threshold=args.val_positive_dist_threshold,
                       train_positive_dist_threshold=args.train_positives_dist_threshold,
                       skip_bad_images=args.skip_bad_images, num_workers=args.num_workers,
                       msls_cache_dir=args.msls_cache_dir)
    model, checkpoint = util.build_model(args.model_config, resume=args.resume, backbone_weights=args.backbone_weights,
                                         strict=not args.non_strict_resume)
    if checkpoint is None:
        logger.warning("no --resume: mining with an untrained global model gives poor negatives")
    model = model.to(device)
    descriptors = compute_global_descriptors(model, index, np.arange(len(index)), args.resize, device,
                                             args.infer_batch_size, args.num_workers, args.precision)
    hard_negatives = hard_negatives_from_descriptors(descriptors[:index.database_num], descriptors[index.database_num:],
                                                     index.soft_positives_per_query, args.num_hard_negatives,
                                                     args.chunk_size)
    padded = int((hard_negatives < 0).sum())
    metadata = {"dataset": index.name, "datasets_folder": str(args.datasets_folder), **dataset_fingerprints(index),
                "queries_num": index.queries_num, "database_num": index.database_num,
                "num_hard_negatives": args.num_hard_negatives,
                "positive_dist_threshold": args.val_positive_dist_threshold,
                "train_positives_dist_threshold": args.train_positives_dist_threshold,
                "model_checkpoint": args.resume, "model_checkpoint_sha1": file_sha1(args.resume) if args.resume else None,
                "model": model.config.to_dict(), "image_size": list(args.resize)}
    save_hard_negatives(args.output, hard_negatives, metadata)
    logger.info("wrote %s: %d queries x %d negatives (%d padding entries) in %.0f s", args.output,
                *hard_negatives.shape, padded, time.perf_counter() - started)
    return args.output


if __name__ == "__main__":
    util.run_entry_point(main)
