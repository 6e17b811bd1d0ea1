"""Where a training run is, and its checkpoints: the state (position, best epoch, history, the current round's
tuples), the learning-rate schedule, last.pth with everything --resume needs to continue exactly where it stopped
(docs/checkpoints.md), and what a resume with other flags changes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import distributed
import runs
import util
from config import resume_free_flags
from mining import TupleMiner, Tuples
from model.checkpoint import LoadedCheckpoint, open_checkpoint, save_model
from model.network import PRGSNetwork
from parser import train_parser

logger = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """Where training is and what it has seen. Position = the next (epoch, round, step in round) to run;
    tuples_done counts the current round's tuples already trained on (step_in_round x the batch size it ran with)."""

    epoch: int = 0
    round: int = 0
    step_in_round: int = 0
    tuples_done: int = 0
    global_step: int = 0
    best_metric: float = -1.0
    best_epoch: int = -1
    not_improved: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    history: list[dict] = field(default_factory=list)
    tuples: Tuples | None = None  # the current round's tuples while it is in progress

    def to_checkpoint(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k != "tuples"}
        state["tuples"] = self.tuples.state() if self.tuples is not None else None
        return state

    @classmethod
    def from_checkpoint(cls, state: dict) -> TrainingState:
        state = dict(state)
        tuples = state.pop("tuples")
        return cls(**state, tuples=Tuples.from_state(tuples) if tuples is not None else None)

    def end_epoch(self, metric: float, record: dict, recall_n: int, patience: int) -> bool:
        """Close the epoch just validated: keep its history ``record``, count it against the best validation
        R@recall_n so far (``metric``: this epoch's), move to the next epoch's start; returns whether it improved."""
        improved = metric > self.best_metric
        self.history.append(record)
        if improved:
            logger.info("improved: R@%d %.2f -> %.2f", recall_n, max(self.best_metric, 0), metric)
            self.best_metric, self.best_epoch, self.not_improved = metric, self.epoch, 0
        else:
            self.not_improved += 1
            logger.info(
                "not improved (%d / %d): R@%d %.2f, best %.2f at epoch %d",
                self.not_improved,
                patience,
                recall_n,
                metric,
                self.best_metric,
                self.best_epoch,
            )
        self.epoch, self.round, self.loss_sum, self.loss_count = self.epoch + 1, 0, 0.0, 0
        return improved


def lr_factor(epoch: int, args) -> float:
    """Learning-rate multiplier for an epoch: linear warm-up from 0.1, then step decay or cosine, as the reference."""
    if epoch < args.warmup_epochs:
        progress = epoch / args.warmup_epochs
        return 0.1 * (1 - progress) + progress
    if args.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / args.epochs_num))
    return args.lr_step_gamma ** ((epoch - args.warmup_epochs) // args.lr_step_epochs)


def save_training_checkpoint(
    path: Path,
    model: PRGSNetwork,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    miner: TupleMiner,
    args,
    device: torch.device,
) -> None:
    """last.pth: the weights and what an exact resume needs (state, optimiser, schedule, RNG, the miner's previous
    negatives, the device and the number of processes), written atomically."""
    previous = miner.previous_negatives
    queries = torch.tensor(sorted(previous), dtype=torch.long)
    negatives = torch.from_numpy(np.stack([previous[int(q)] for q in queries])) if len(queries) else torch.empty(0)
    save_model(
        model,
        path,
        training_state={
            "state": state.to_checkpoint(),
            "optimizer": optimizer.state_dict(),
            "scheduler": {
                "schedule": args.lr_schedule,
                "epoch": state.epoch,
                "lr_factor": lr_factor(state.epoch, args),
            },
            "rng": util.rng_states(),
            "previous_negatives": {"queries": queries, "negatives": negatives},
            "device": str(device),
            "world_size": distributed.world_size(),
        },
        args=runs.plain_args(args),
    )


def restore_training(
    checkpoint: LoadedCheckpoint, optimizer: torch.optim.Optimizer, miner: TupleMiner
) -> TrainingState:
    """Optimizer, miner, RNG and position from one of our checkpoints."""
    training = checkpoint.state["training_state"]
    optimizer.load_state_dict(training["optimizer"])
    previous = training["previous_negatives"]
    miner.previous_negatives = {int(q): n.numpy() for q, n in zip(previous["queries"], previous["negatives"])}
    util.set_rng_states(training["rng"])
    state = dict(training["state"])
    if "tuples_done" not in state:  # written before tuples_done was recorded: steps of the checkpoint's batch size
        state["tuples_done"] = state["step_in_round"] * (checkpoint.state.get("args") or {})["train_batch_size"]
    return TrainingState.from_checkpoint(state)


# Flags a resume may give freely: those of the argument groups that do not change what training computes, and the
# model's (the checkpoint sets them); decided by group in config.resume_free_flags.
RESUME_FREE_FLAGS = resume_free_flags(train_parser())


def resume_differences(checkpoint_state: dict, args, device: torch.device) -> list[str]:
    """What will differ from the interrupted run when resuming its last.pth with these flags: every flag that
    changes training, validation or stopping and has another value than the checkpoint's, and the device."""
    saved_args = checkpoint_state.get("args") or {}
    now = runs.plain_args(args)
    differences = [
        f"--{name} {_flag_text(now[name])} (the checkpoint's: {_flag_text(saved_args[name])})"
        for name in sorted(set(now) & set(saved_args) - RESUME_FREE_FLAGS)
        if now[name] != saved_args[name]
    ]
    saved_device = checkpoint_state["training_state"].get("device")
    if saved_device is not None and torch.device(saved_device).type != device.type:
        differences.append(f"device {device.type} (the checkpoint's: {saved_device}; floating-point results differ)")
    saved_world = checkpoint_state["training_state"].get("world_size", 1)
    if saved_world != distributed.world_size():
        differences.append(
            f"{distributed.world_size()} process(es) (the checkpoint's: {saved_world}): the global batch, the tuples, "
            "the optimiser and the schedule continue as saved, but each step's gradient is averaged over another "
            "split of the batch, so the weights follow the uninterrupted run up to float rounding, not bit for bit"
        )
    return differences


def _flag_text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def start_or_resume(
    checkpoint: LoadedCheckpoint | None,
    optimizer: torch.optim.Optimizer,
    miner: TupleMiner,
    args,
    run: runs.Run,
) -> TrainingState:
    """The exact training state of a last.pth of this stage (restoring ``optimizer`` and ``miner`` too); a fresh
    state for anything else. A resumed run says which flags differ from the interrupted one (then it continues, but
    not exactly as that run would have), and takes the interrupted run's best.pth along when it writes to another
    folder."""
    resumed_stage = (checkpoint.state.get("args") or {}).get("train_stage") if checkpoint is not None else None
    if checkpoint is not None and "training_state" in checkpoint.state and resumed_stage == args.train_stage:
        state = restore_training(checkpoint, optimizer, miner)
        differences = resume_differences(checkpoint.state, args, run.device)
        where = f"epoch {state.epoch}, round {state.round}, step {state.step_in_round} ({state.global_step} steps done)"
        if differences:
            logger.warning(
                "resuming %s at %s, but NOT exactly as the interrupted run would have continued: %s. Training "
                "continues with the new values; repeat the checkpoint's values for an exact resume",
                checkpoint.path,
                where,
                "; ".join(differences),
            )
        else:
            logger.info("resuming %s exactly: %s", checkpoint.path, where)
        run.note("last.pth", f"epoch {state.epoch}, round {state.round}, step {state.global_step}, as resumed")
        if state.best_epoch >= 0:
            run.note("best.pth", f"epoch {state.best_epoch}")
        adopt_best(checkpoint.path.parent, state, run)
        return state
    if checkpoint is not None:
        logger.info(
            "--resume %s (%s layout%s) initialises the weights only; training starts at epoch 0",
            checkpoint.path,
            checkpoint.layout,
            f", stage {resumed_stage}" if resumed_stage else "",
        )
    return TrainingState()


def adopt_best(resumed_folder: Path, state: TrainingState, run: runs.Run) -> None:
    """Copy the interrupted run's best.pth into this run's folder when they differ, so that the final test
    tests the best epoch of the whole run."""
    if state.best_epoch < 0 or resumed_folder.resolve() == run.folder.resolve():
        return
    source = resumed_folder / "best.pth"
    epoch = open_checkpoint(source).state.get("metrics", {}).get("epoch") if source.is_file() else None
    if epoch != state.best_epoch:
        logger.warning(
            "the best epoch so far (%d) has no best.pth beside the resumed checkpoint (%s%s): the final test "
            "will test this run's best epoch if a later one improves, else none",
            state.best_epoch,
            source,
            f" holds epoch {epoch}" if epoch is not None else " is missing",
        )
        return
    if distributed.is_main():
        util.atomic_write(run.folder / "best.pth", lambda file: file.write(source.read_bytes()))
    run.note("best.pth", f"epoch {epoch}, copied from {source}")
    logger.info("copied best.pth (epoch %d) from %s", epoch, source)
