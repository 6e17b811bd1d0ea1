"""Train PRGS: mine tuples, optimise, validate every epoch, keep last.pth / best.pth, stop early, test the best.

    python3 train_reranking.py --dataset_name msls --datasets_folder /data --resume resume/msls_v2_deits.pth \\
        --mining global --hard_negatives result/msls_hard_negatives.npz ...   (train_reranking.sh has the recipes)

Stages (--train_stage): 'reranker' trains local_head + the reranker on a frozen backbone (the reference's), 'full'
also the backbone, 'global' the global descriptor alone. See losses.py for the loss, training_state.py for the
checkpoints.
`torchrun --nproc_per_node N train_reranking.py ...` trains with N processes (docs/distributed.md).
"""

from __future__ import annotations

import runs
from config import model_options, resumes_into_output_folder
from datasets_ws import load_split, split_request
from model.checkpoint import build_model
from parser import parse_train_args
from training import Trainer, TrainingSplits


def main(argv: list[str] | None = None) -> dict:
    args = parse_train_args(argv)
    with runs.start_run(args, resumes_in_place=resumes_into_output_folder(args)) as run:
        splits = TrainingSplits(
            *(load_split(split_request(args, split)) for split in ("train", "val", args.test_split))
        )
        model, checkpoint = build_model(args.model_config, **model_options(args))
        trainer = Trainer(model.to(run.device), checkpoint, splits, args, run)
        trainer.test_before_training()
        stopped = trainer.train()
        trainer.test_best(stopped)
        return trainer.write_results(stopped)


if __name__ == "__main__":
    runs.run_entry_point(main)
