"""The flags that only training and mining take (train_reranking.py, pre_compute_mining.py), in argument groups by
what they change; parser.py builds the entry points' parsers from these and the shared groups."""

from __future__ import annotations

import argparse

from flag_types import non_negative_float, non_negative_int, positive_float, positive_int


def add_train_split_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--train_positives_dist_threshold",
        type=positive_float,
        default=10.0,
        help="metres: database images this close to a training query are its positives; queries "
        "without one are left out of training",
    )


def add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--train_stage",
        choices=("reranker", "full", "global"),
        default="reranker",
        help="what is trained (see the description above)",
    )
    group.add_argument("--epochs_num", type=positive_int, default=50, help="maximum number of epochs")
    group.add_argument(
        "--patience", type=positive_int, default=3, help="stop after this many epochs without a better validation R@1"
    )
    group.add_argument("--train_batch_size", type=positive_int, default=8, help="tuples per optimiser step")
    group.add_argument(
        "--cache_frozen_backbone",
        action="store_true",
        help="stage reranker only: compute every training image's (frozen) backbone outputs once and "
        "keep them in RAM (L x C x 4 bytes per image), so each step runs only local_head and the "
        "reranker. For small datasets such as the toy world",
    )
    group = parser.add_argument_group("checkpointing")
    group.add_argument(
        "--checkpoint_every_steps",
        type=non_negative_int,
        default=0,
        help="also write last.pth every this many optimiser steps (0: at the end of each epoch "
        "only); a resumed run continues exactly where the checkpoint was written",
    )
    group.add_argument(
        "--max_steps",
        type=non_negative_int,
        default=0,
        help="stop after this many optimiser steps in all (0: no limit), writing last.pth so that "
        "--resume continues exactly",
    )


def add_mining_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mining")
    group.add_argument(
        "--mining",
        choices=("global", "partial", "full", "random"),
        default="partial",
        help="negatives: 'global' samples from --hard_negatives (pre_compute_mining.py); 'partial' "
        "takes the hardest of --neg_samples_num random database images; 'full' also keeps each "
        "query's previous negatives; 'random' samples at random. Never a soft positive",
    )
    group.add_argument(
        "--hard_negatives",
        default=None,
        help="hard-negative file written by pre_compute_mining.py (needed by --mining global)",
    )
    group.add_argument(
        "--neg_hardness",
        type=positive_int,
        default=100,
        help="--mining global samples negatives from this many of each query's hardest negatives",
    )
    group.add_argument(
        "--negs_num_per_query",
        type=positive_int,
        default=10,
        help="negatives per training query (a tuple has 2 + this many images)",
    )
    group.add_argument(
        "--neg_samples_num",
        type=positive_int,
        default=1000,
        help="random database images each mining round considers (partial/full mining)",
    )
    group.add_argument("--queries_per_epoch", type=positive_int, default=5000, help="training queries per epoch")
    group.add_argument(
        "--cache_refresh_rate",
        type=positive_int,
        default=1000,
        help="queries per mining round; negatives are mined again every this many queries "
        "(descriptors of a frozen global model are computed once and reused)",
    )


def add_optimiser_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimiser")
    group.add_argument("--lr", type=positive_float, default=1e-5, help="AdamW learning rate")
    group.add_argument("--weight_decay", type=non_negative_float, default=0.03, help="AdamW weight decay")
    group.add_argument(
        "--lr_schedule",
        choices=("step", "cosine"),
        default="step",
        help="per epoch after warm-up: 'step' multiplies the lr by --lr_step_gamma every "
        "--lr_step_epochs epochs (the reference: x0.1 every 4); 'cosine' decays it to 0 at "
        "--epochs_num",
    )
    group.add_argument("--lr_step_epochs", type=positive_int, default=4, help="epochs between lr steps")
    group.add_argument("--lr_step_gamma", type=positive_float, default=0.1, help="lr factor at each step")
    group.add_argument(
        "--warmup_epochs", type=non_negative_int, default=0, help="epochs of linear warm-up from 0.1 x lr"
    )
    group.add_argument(
        "--margin",
        type=positive_float,
        default=0.1,
        help="triplet-loss margin on the global descriptors (stages full and global)",
    )
    group.add_argument("--grad_clip", type=non_negative_float, default=0.0, help="clip the gradient norm (0: off)")
