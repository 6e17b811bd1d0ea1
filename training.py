"""Training: mine tuples, optimise, validate every epoch, keep last/best checkpoints, stop early, test the best.
train_reranking.py drives a ``Trainer``; train_reranking.sh has the recipes.

Stages (--train_stage):
    reranker  backbone frozen; local_head + reranker trained with cross-entropy on positive-vs-negative logits
    full      also the backbone, adding a triplet loss on the global descriptors
    global    the global descriptor alone, triplet loss (what the reference's train_global_retrieval.sh meant to do)

Loss scale (a deliberate choice): the reranker loss is 0.5 * CE(positive, "same") + 0.5 * mean over negatives of
CE(negative, "different"), i.e. both classes weigh the same, as in the reference, but without the reference's extra
1/train_batch_size factor. Under AdamW a constant factor on the loss leaves the updates unchanged (up to
eps), so learning rates transfer from the reference. The triplet term is the mean over all (query, positive,
negative) triplets, as in the reference, and is simply added.

Checkpoints (last.pth and best.pth, written atomically; docs/checkpoints.md) hold what --resume last.pth needs to
continue exactly where it stopped.

Several processes (torchrun, docs/distributed.md): --train_batch_size is the global batch; each rank takes its
contiguous share of every batch and DistributedDataParallel averages the gradients, so a step equals one process's
step on the whole batch up to float rounding. Mining descriptors, the frozen-backbone cache and validation are split
across the ranks and gathered; every rank then holds the same state, and rank 0 alone writes files.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data
from tqdm import tqdm

import distributed
import util
from config import eval_settings, output_options
from datasets_ws import TupleDataset
from evaluation import evaluate
from extraction import ExtractionSettings, FrozenBackboneCache, global_descriptors
from metrics import first_correct_rank, paired_bootstrap
from mining import MiningError, TupleMiner, Tuples, file_sha1, load_hard_negatives
from model.backbone import patch_grid
from model.checkpoint import LoadedCheckpoint, load_weights, open_checkpoint, save_model
from model.network import PRGSNetwork
from outputs import build_results, recalls_by_name, recalls_table, write_outputs
from places.index import DatasetError, PlaceIndex
from visualize import save_training_curves

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Stage set-up, schedule, loss


def configure_stage(model: PRGSNetwork, stage: str) -> list[torch.nn.Parameter]:
    """Freeze what the stage does not train; return the trainable parameters."""
    trains_backbone = stage in ("full", "global")
    trains_reranker = stage in ("reranker", "full")
    for parameter in model.backbone.parameters():
        parameter.requires_grad = trains_backbone
    for module in (model.local_head, model.reranker):
        for parameter in module.parameters():
            parameter.requires_grad = trains_reranker
    return [p for p in model.parameters() if p.requires_grad]


def set_train_mode(model: PRGSNetwork, stage: str) -> None:
    """Training mode, except a frozen backbone stays in eval mode (BatchNorm statistics of a ResNet stay fixed)."""
    model.train()
    model.backbone.train(stage != "reranker")


def lr_factor(epoch: int, args) -> float:
    """Learning-rate multiplier for an epoch: linear warm-up from 0.1, then step decay or cosine, as the reference."""
    if epoch < args.warmup_epochs:
        progress = epoch / args.warmup_epochs
        return 0.1 * (1 - progress) + progress
    if args.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / args.epochs_num))
    return args.lr_step_gamma ** ((epoch - args.warmup_epochs) // args.lr_step_epochs)


def tuple_loss(
    model: PRGSNetwork, images: torch.Tensor, stage: str, margin: float, grid: tuple[int, int]
) -> tuple[torch.Tensor, dict[str, float]]:
    """images (B, T, 3, H, W), T = 2 + negs in the order query, positive, negatives -> (loss, its parts)."""
    batch, group = images.shape[:2]
    flat = images.flatten(0, 1)  # (B*T, 3, H, W)
    parts = {}
    if stage == "global":
        descriptors = model(flat, global_only=True)
        loss = parts["triplet"] = triplet_loss(descriptors.reshape(batch, group, -1), margin)
    else:
        descriptors, local = model(flat)
        loss = parts["rerank_ce"] = rerank_loss(model, local.reshape(batch, group, *local.shape[1:]), grid)
        if stage == "full":
            parts["triplet"] = triplet_loss(descriptors.reshape(batch, group, -1), margin)
            loss = loss + parts["triplet"]
    return loss, {k: float(v.detach()) for k, v in parts.items()}


def rerank_loss(model: PRGSNetwork, local: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """local (B, T, L, C) as query, positive, negatives -> 0.5 CE(positive, same) + 0.5 mean CE(negative, other)."""
    batch, group = local.shape[:2]
    logits = model.rerank_logits(local[:, 0], local[:, 1:], grid).float()  # (B, 1 + negs, 2)
    positive = F.cross_entropy(logits[:, 0], torch.ones(batch, dtype=torch.long, device=logits.device))
    negatives = F.cross_entropy(
        logits[:, 1:].flatten(0, 1), torch.zeros(batch * (group - 2), dtype=torch.long, device=logits.device)
    )
    return 0.5 * positive + 0.5 * negatives


class TupleObjective(torch.nn.Module):
    """The loss of a batch of tuples as a module, what DistributedDataParallel wraps so that backward averages the
    gradients across ranks. forward(images (B, T, 3, H, W), or None when ``cache`` holds the backbone outputs;
    image ids (B, T)) -> (loss, its parts)."""

    def __init__(
        self,
        model: PRGSNetwork,
        stage: str,
        margin: float,
        grid: tuple[int, int],
        cache: FrozenBackboneCache | None,
        device: torch.device,
    ):
        super().__init__()
        self.model, self.stage, self.margin, self.grid = model, stage, margin, grid
        self.cache, self.device = cache, device

    def forward(self, images: torch.Tensor | None, image_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if self.cache is None:
            return tuple_loss(self.model, images, self.stage, self.margin, self.grid)
        local = self.cache.local(self.model, image_ids.flatten(), self.device)  # (B*T, L, C)
        loss = rerank_loss(self.model, local.reshape(*image_ids.shape, *local.shape[1:]), self.grid)
        return loss, {"rerank_ce": float(loss.detach())}


def triplet_loss(descriptors: torch.Tensor, margin: float) -> torch.Tensor:
    """descriptors (B, T, D) as query, positive, negatives -> mean triplet margin loss over the B*(T-2) triplets."""
    negatives = descriptors[:, 2:]
    anchors = descriptors[:, :1].expand_as(negatives)
    positives = descriptors[:, 1:2].expand_as(negatives)
    return F.triplet_margin_loss(
        anchors.flatten(0, 1).float(),
        positives.flatten(0, 1).float(),
        negatives.flatten(0, 1).float(),
        margin=margin,
        p=2,
    )


# ----------------------------------------------------------------------------------------------------------------
# Training state and checkpoints


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


def save_training_checkpoint(
    path: Path,
    model: PRGSNetwork,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    miner: TupleMiner,
    args,
    device: torch.device,
) -> None:
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
        args=util.plain_args(args),
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


# Flags that do not change what training computes, or that the checkpoint itself sets (the model's): a resume may
# give them freely.
RESUME_FREE_FLAGS = frozenset(
    (
        "backbone",
        "fc_output_dim",
        "local_dim",
        "num_kept_nodes",
        "temperature",
        "output_folder",
        "save_dir",
        "overwrite",
        "resume",
        "non_strict_resume",
        "backbone_weights",
        "datasets_folder",
        "msls_cache_dir",
        "max_steps",
        "checkpoint_every_steps",
        "num_workers",
        "device",
        "test_split",
        "test_before_training",
        "num_preds_to_save",
        "save_only_wrong_preds",
    )
)


def resume_differences(checkpoint_state: dict, args, device: torch.device) -> list[str]:
    """What will differ from the interrupted run when resuming its last.pth with these flags: every flag that
    changes training, validation or stopping and has another value than the checkpoint's, and the device."""
    saved_args = checkpoint_state.get("args") or {}
    now = util.plain_args(args)
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


class TrainingDivergedError(util.PRGSError):
    """A non-finite loss or non-finite weights: training stops before anything is saved from them."""


def check_training_settings(splits: TrainingSplits, args) -> None:
    """Refuse, before any work, splits and flags with which training cannot run as asked: an empty validation or
    test split, or a batch larger than a mining round (no step would run)."""
    for name in ("val", "test"):
        index = getattr(splits, name)
        if index.queries_num == 0 or index.database_num == 0:
            raise DatasetError(
                f"the {name} split {index.summary()} has no queries or no database images: training could not "
                f"validate or test on it"
            )
    queries_per_round = min(args.cache_refresh_rate, splits.train.queries_num)
    if 0 < queries_per_round < args.train_batch_size:
        raise MiningError(
            f"--train_batch_size {args.train_batch_size} is larger than a mining round of {queries_per_round} "
            f"queries (--cache_refresh_rate {args.cache_refresh_rate}, {splits.train.queries_num} training queries): "
            f"no step would run. Use --train_batch_size {queries_per_round} or less"
        )


# ----------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainingSplits:
    train: PlaceIndex
    val: PlaceIndex  # validated every epoch; selects the best epoch
    test: PlaceIndex  # --test_split: the best model's final test


class Trainer:
    """One training run: the model and what trains it (optimiser, miner, frozen-backbone cache), where training is
    (``state``), and the run's outputs (``results``, checkpoints in ``run.folder``)."""

    def __init__(
        self, model: PRGSNetwork, checkpoint: LoadedCheckpoint | None, splits: TrainingSplits, args, run: util.Run
    ):
        self.model, self.splits, self.args, self.run = model, splits, args, run
        self.device, self.grid = run.device, patch_grid(args.resize)
        self.with_rerank = args.train_stage != "global"
        check_training_settings(splits, args)
        self.trainable = configure_stage(model, args.train_stage)
        logger.info(
            "stage %s: %d trainable parameters of %d (%s, input %dx%d)",
            args.train_stage,
            util.count_parameters(model, trainable_only=True),
            util.count_parameters(model),
            model.config.backbone,
            *args.resize,
        )
        self.per_rank_batch = per_process_batch(args.train_batch_size)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=args.lr, weight_decay=args.weight_decay)
        self.miner = TupleMiner(
            splits.train,
            args.mining,
            args.negs_num_per_query,
            args.neg_hardness,
            args.neg_samples_num,
            self._hard_negatives(),
        )
        self.state = self._start_or_resume(checkpoint)
        self.hits_before: dict[str, np.ndarray] | None = None  # per test query, from --test_before_training
        self.steps_at_start = self.state.global_step
        self.settings = eval_settings(args, self.device)
        self.cache: FrozenBackboneCache | None = None
        self.objective: torch.nn.Module | None = None  # TupleObjective, wrapped for several ranks; made by train()
        self.train_seconds = 0.0  # in mining rounds' steps (data loading included), for results.json's throughput
        self.results: dict = {
            "stage": args.train_stage,
            "datasets": {name: getattr(splits, name).summary() for name in ("train", "val", "test")},
        }

    def _hard_negatives(self) -> np.ndarray | None:
        """The --hard_negatives file's list for --mining global (checked against the training split), else None."""
        args = self.args
        if args.mining != "global":
            return None
        hint = (
            f"python3 pre_compute_mining.py --dataset_name {args.dataset_name} --datasets_folder "
            f"{args.datasets_folder} --resume GLOBAL_MODEL --output {args.hard_negatives}"
        )
        hard_negatives, metadata = load_hard_negatives(args.hard_negatives, self.splits.train, args.neg_hardness, hint)
        logger.info(
            "hard negatives from %s (mined %s with %s)",
            args.hard_negatives,
            metadata.get("created"),
            metadata.get("model_checkpoint"),
        )
        if args.resume and metadata.get("model_checkpoint_sha1") not in (None, file_sha1(args.resume)):
            logger.warning(
                "the hard negatives were mined with another model (%s) than --resume %s: they may not be "
                "the hardest for this one. Rebuild them with: %s",
                metadata.get("model_checkpoint"),
                args.resume,
                hint.replace("GLOBAL_MODEL", args.resume),
            )
        return hard_negatives

    def _start_or_resume(self, checkpoint: LoadedCheckpoint | None) -> TrainingState:
        """The exact training state of a last.pth of this stage; a fresh state for anything else. A resumed run
        says which flags differ from the interrupted one (then it continues, but not exactly as that run would
        have), and takes the interrupted run's best.pth along when it writes to another folder."""
        resumed_stage = (checkpoint.state.get("args") or {}).get("train_stage") if checkpoint is not None else None
        if checkpoint is not None and "training_state" in checkpoint.state and resumed_stage == self.args.train_stage:
            state = restore_training(checkpoint, self.optimizer, self.miner)
            differences = resume_differences(checkpoint.state, self.args, self.device)
            where = (
                f"epoch {state.epoch}, round {state.round}, step {state.step_in_round} ({state.global_step} steps done)"
            )
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
            self.run.note("last.pth", f"epoch {state.epoch}, round {state.round}, step {state.global_step}, as resumed")
            if state.best_epoch >= 0:
                self.run.note("best.pth", f"epoch {state.best_epoch}")
            self._adopt_best(checkpoint.path.parent, state)
            return state
        if checkpoint is not None:
            logger.info(
                "--resume %s (%s layout%s) initialises the weights only; training starts at epoch 0",
                checkpoint.path,
                checkpoint.layout,
                f", stage {resumed_stage}" if resumed_stage else "",
            )
        return TrainingState()

    def _adopt_best(self, resumed_folder: Path, state: TrainingState) -> None:
        """Copy the interrupted run's best.pth into this run's folder when they differ, so that the final test
        tests the best epoch of the whole run."""
        if state.best_epoch < 0 or resumed_folder.resolve() == self.run.folder.resolve():
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
            util.atomic_write(self.run.folder / "best.pth", lambda file: file.write(source.read_bytes()))
        self.run.note("best.pth", f"epoch {epoch}, copied from {source}")
        logger.info("copied best.pth (epoch %d) from %s", epoch, source)

    def test_before_training(self) -> None:
        """With --test_before_training on a fresh start: the test split's recalls before any step."""
        if self.args.test_before_training and self.state.global_step == 0:
            before = evaluate(
                self.model, self.splits.test, self.settings, self.run.folder / "work", with_rerank=self.with_rerank
            )
            self.results["test_before_training"] = recalls_by_name(before)
            self.hits_before = self._test_hits(before)
            logger.info("test before training (%s):\n%s", self.splits.test.summary(), recalls_table(before))

    def _test_hits(self, evaluation) -> dict[str, np.ndarray] | None:
        """Per test query, whether global / reranked retrieval has a positive in its first N (N = the smallest
        --recall_values), or None without ground truth or without a reranker (the global stage)."""
        positives = self.splits.test.soft_positives_per_query
        if positives is None or not self.with_rerank:
            return None
        n = self.args.recall_values[0]
        return {
            "global": first_correct_rank(evaluation.global_predictions, positives) < n,
            "reranked": first_correct_rank(evaluation.reranked_predictions, positives) < n,
        }

    def train(self) -> str:
        """Epochs until --epochs_num, early stopping or --max_steps; returns which of the three stopped it."""
        args = self.args
        if args.cache_frozen_backbone:
            loop = ExtractionSettings(args.resize, self.device, args.infer_batch_size, args.num_workers, args.precision)
            self.cache = FrozenBackboneCache(self.model, self.splits.train, loop)
        objective = TupleObjective(self.model, args.train_stage, args.margin, self.grid, self.cache, self.device)
        self.objective = distributed.wrap_for_training(objective, self.device)
        if args.cache_refresh_rate > self.splits.train.queries_num:
            logger.warning(
                "--cache_refresh_rate %d is larger than the %d training queries: each round uses all of them",
                args.cache_refresh_rate,
                self.splits.train.queries_num,
            )
        while self.state.epoch < args.epochs_num:
            epoch_start = time.perf_counter()
            if not self._train_epoch():
                return "max_steps"
            if self._validate(epoch_start):
                return "early_stopping"
        return "epochs_num"

    def _train_epoch(self) -> bool:
        """The rest of the current epoch's mining rounds; False when --max_steps stopped it."""
        args, state = self.args, self.state
        for group in self.optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(state.epoch, args)
        rounds_per_epoch = args.queries_per_epoch // args.cache_refresh_rate
        queries_per_round = min(args.cache_refresh_rate, self.splits.train.queries_num)
        while state.round < rounds_per_epoch:
            if state.tuples is None:
                rng = np.random.default_rng([args.seed, state.epoch, state.round])
                queries = rng.choice(self.splits.train.queries_num, queries_per_round, replace=False)
                state.tuples = self.miner.mine(
                    queries, rng, self.global_descriptors_of, global_model_frozen=args.train_stage == "reranker"
                )
            started = time.perf_counter()
            finished = self._run_round(state.tuples)
            self.train_seconds += time.perf_counter() - started
            if not finished:
                return False
            state.round, state.step_in_round, state.tuples_done, state.tuples = state.round + 1, 0, 0, None
        return True

    def global_descriptors_of(self, image_ids: np.ndarray) -> np.ndarray:
        """Global descriptors (n, D) of training images (global indices), for mining."""
        if self.cache is not None:
            return self.cache.descriptors[image_ids]
        args = self.args
        loop = ExtractionSettings(args.resize, self.device, args.infer_batch_size, args.num_workers, args.precision)
        return global_descriptors(self.model, self.splits.train, image_ids, loop, "mining descriptors")

    def _batches(self, tuples: Tuples):
        """(images (b, T, 3, H, W) or None when the cache holds the backbone outputs, image ids (b, T)) of the
        current round from its tuple state.tuples_done on: this rank's b tuples of each global batch."""
        rows = rank_share(len(tuples.queries), self.args.train_batch_size, self.state.tuples_done)
        dataset = TupleDataset(
            self.splits.train,
            tuples.queries[rows],
            tuples.positives[rows],
            tuples.negatives[rows],
            self.args.resize,
        )
        batch_size = self.per_rank_batch
        if self.cache is not None:
            ids = torch.from_numpy(dataset.image_ids)
            return [(None, ids[i : i + batch_size]) for i in range(0, len(ids) - batch_size + 1, batch_size)]
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            drop_last=True,
            num_workers=self.args.num_workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),
        )

    def _run_round(self, tuples: Tuples) -> bool:
        """Train on one mining round from state.step_in_round. Returns False when --max_steps stopped it."""
        args, state = self.args, self.state
        set_train_mode(self.model, args.train_stage)
        bar = tqdm(self._batches(tuples), desc=f"epoch {state.epoch:02d} round {state.round}", unit="step", leave=False)
        for images, image_ids in bar:
            if args.max_steps and state.global_step >= args.max_steps:
                self.save_last()
                return False
            loss, parts = self._step(images, image_ids)
            state.global_step += 1
            state.step_in_round += 1
            state.tuples_done += args.train_batch_size  # the global batch, whatever this rank's share
            state.loss_sum += loss
            state.loss_count += 1
            bar.set_postfix(loss=f"{loss:.4f}", mean=f"{state.loss_sum / state.loss_count:.4f}")
            if state.global_step <= 2 or state.global_step % 100 == 0:
                logger.debug("step %d: loss %.5f %s", state.global_step, loss, parts)
            if args.max_steps and state.global_step >= args.max_steps:
                self.save_last()
                return False
            if args.checkpoint_every_steps and state.global_step % args.checkpoint_every_steps == 0:
                self.save_last()
        return True

    def _step(self, images: torch.Tensor | None, image_ids: torch.Tensor) -> tuple[float, dict[str, float]]:
        """One optimiser step on a batch of tuples (this rank's share); returns (loss, its parts) of the whole global
        batch (the mean over ranks)."""
        args = self.args
        if images is not None:
            images = images.to(self.device, non_blocking=True)
        with util.autocast(self.device, args.precision):
            loss, parts = self.objective(images, image_ids)
        if not torch.isfinite(loss.detach()):
            raise self._diverged(f"the loss is {float(loss.detach())}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, args.grad_clip)
        self.optimizer.step()
        if distributed.world_size() == 1:
            return float(loss.detach()), parts
        means = distributed.mean_over_ranks([float(loss.detach()), *parts.values()])
        return means[0], dict(zip(parts, means[1:]))

    def save_last(self) -> None:
        """last.pth by rank 0 (every rank holds the same state), after checking that the weights are finite (a
        diverged run never overwrites a good one)."""
        self._check_finite_weights()
        state = self.state
        if distributed.is_main():
            save_training_checkpoint(
                self.run.folder / "last.pth", self.model, self.optimizer, state, self.miner, self.args, self.device
            )
        self.run.note("last.pth", f"epoch {state.epoch}, round {state.round}, step {state.global_step}")

    def _check_finite_weights(self) -> None:
        bad = [name for name, p in self.model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise self._diverged(f"{len(bad)} weight tensors hold NaN or infinite values (e.g. {bad[0]})")

    def _diverged(self, what: str) -> TrainingDivergedError:
        state, lr = self.state, self.optimizer.param_groups[0]["lr"]
        return TrainingDivergedError(
            f"training diverged at epoch {state.epoch}, step {state.global_step}: {what} (lr {lr:.3g}). Nothing was "
            f"saved from these weights; lower --lr or set --grad_clip, and resume from the last good last.pth"
        )

    def _validate(self, epoch_start: float) -> bool:
        """Validate the epoch just trained, keep last.pth (and best.pth when it improved), draw the curves; returns
        True when patience ran out."""
        args, state = self.args, self.state
        self._check_finite_weights()
        validation = evaluate(
            self.model, self.splits.val, self.settings, self.run.folder / "work", with_rerank=self.with_rerank
        )
        metric = (validation.reranked_recalls if self.with_rerank else validation.global_recalls)[args.recall_values[0]]
        improved = metric > state.best_metric
        mean_loss = state.loss_sum / max(1, state.loss_count)
        lr = self.optimizer.param_groups[0]["lr"]
        state.history.append(
            {
                "epoch": state.epoch,
                "loss": mean_loss,
                "lr": lr,
                "val": recalls_by_name(validation),
                "seconds": round(time.perf_counter() - epoch_start, 1),
            }
        )
        logger.info(
            "epoch %02d: mean loss %.5f, lr %.2e, %.0f s; validation on %s:\n%s",
            state.epoch,
            mean_loss,
            lr,
            time.perf_counter() - epoch_start,
            self.splits.val.summary(),
            recalls_table(validation),
        )
        if improved:
            logger.info("improved: R@%d %.2f -> %.2f", args.recall_values[0], max(state.best_metric, 0), metric)
            state.best_metric, state.best_epoch, state.not_improved = metric, state.epoch, 0
        else:
            state.not_improved += 1
            logger.info(
                "not improved (%d / %d): R@%d %.2f, best %.2f at epoch %d",
                state.not_improved,
                args.patience,
                args.recall_values[0],
                metric,
                state.best_metric,
                state.best_epoch,
            )
        state.epoch, state.round, state.loss_sum, state.loss_count = state.epoch + 1, 0, 0.0, 0
        self.save_last()
        if distributed.is_main():
            if improved:
                best = self.run.folder / "best.pth"
                save_model(self.model, best, metrics=state.history[-1], args=util.plain_args(args))
            self._save_curves()
        if improved:
            self.run.note("best.pth", f"epoch {state.best_epoch}, val R@{args.recall_values[0]} {metric:.2f}")
        if state.not_improved >= args.patience:
            logger.info("early stopping: %d epochs without improvement", state.not_improved)
            return True
        return False

    def _save_curves(self) -> None:
        history = self.state.history
        first = next(iter(history[0]["val"]["global"]))
        recalls = {"global": [h["val"]["global"][first] for h in history]}
        if self.with_rerank:
            recalls["reranked"] = [h["val"]["reranked"][first] for h in history]
        save_training_curves(
            self.run.folder / "training_curves.png",
            [h["epoch"] for h in history],
            [h["loss"] for h in history],
            recalls,
        )

    def test_best(self, stopped: str) -> None:
        """The best epoch's weights on the test split, with test.py's outputs in <run>/test/ (not after
        --max_steps, nor when no epoch finished)."""
        if stopped == "max_steps" or self.state.best_epoch < 0:
            return
        distributed.barrier()  # rank 0 has written best.pth
        if not (self.run.folder / "best.pth").is_file():
            logger.warning(
                "no best.pth of the best epoch (%d) in %s (see the warning at the resume): no final test",
                self.state.best_epoch,
                self.run.folder,
            )
            self.results["test"] = None
            return
        best = open_checkpoint(self.run.folder / "best.pth")
        load_weights(self.model, best)
        test_started = time.perf_counter()
        after = evaluate(
            self.model, self.splits.test, self.settings, self.run.folder / "work", with_rerank=self.with_rerank
        )
        self.results["test"] = recalls_by_name(after)
        hits_after = self._test_hits(after)
        if hits_after is not None and self.hits_before is not None:
            self.results["test_margins"] = test_margins(self.hits_before, hits_after, self.args.recall_values[0])
        options = output_options(self.args)
        test_results = build_results(
            after,
            self.splits.test,
            self.args.test_split,
            options,
            model=self.model,
            checkpoint=best,
            device=self.device,
            seconds=time.perf_counter() - test_started,
            configuration=util.plain_args(self.args),
        )
        if distributed.is_main():
            write_outputs(self.run.folder / "test", self.splits.test, after, test_results, options)
        logger.info(
            "test of the best model (epoch %d) on %s:\n%s",
            self.state.best_epoch,
            self.splits.test.summary(),
            recalls_table(after),
        )
        if "test_before_training" in self.results:
            logger.info(before_after_table(self.results, self.args.recall_values))

    def write_results(self, stopped: str) -> dict:
        """results.json (docs/outputs.md) in the run folder (written by rank 0); returns it."""
        state, args = self.state, self.args
        key = f"val_{'reranked' if self.with_rerank else 'global'}_R@{args.recall_values[0]}"
        self.results.update(
            {
                "stopped": stopped,
                "epochs_trained": state.epoch,
                "global_step": state.global_step,
                "best": {"epoch": state.best_epoch, key: state.best_metric},
                "history": state.history,
                "checkpoints": {
                    "last": str(self.run.folder / "last.pth"),
                    "best": str(self.run.folder / "best.pth") if (self.run.folder / "best.pth").is_file() else None,
                },
            }
        )
        self.results.update(
            {
                "throughput": {
                    "world_size": distributed.world_size(),
                    "global_batch": args.train_batch_size,
                    "per_process_batch": self.per_rank_batch,
                    "steps_per_second": round(
                        (state.global_step - self.steps_at_start) / max(self.train_seconds, 1e-9), 4
                    ),
                },
                "seconds": round(self.run.seconds(), 1),
                "model": self.model.config.to_dict(),
                "configuration": util.plain_args(args),
            }
        )
        if distributed.is_main():
            util.atomic_write_text(self.run.folder / "results.json", json.dumps(self.results, indent=2))
            logger.info("results: %s", self.run.folder / "results.json")
        return self.results


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


def per_process_batch(train_batch_size: int) -> int:
    """The tuples each rank takes of every global batch of ``train_batch_size`` (checked to divide evenly), logged
    with the global batch."""
    world = distributed.world_size()
    if train_batch_size % world:
        raise distributed.DistributedError(
            f"--train_batch_size {train_batch_size} is the global batch (tuples per optimiser step) and must be a "
            f"multiple of the {world} processes, which share each batch evenly"
        )
    logger.info(
        "batch: %d tuples per optimiser step (global) = %d process(es) x %d tuples per process",
        train_batch_size,
        world,
        train_batch_size // world,
    )
    return train_batch_size // world


def rank_share(num_tuples: int, batch_size: int, first_tuple: int) -> np.ndarray:
    """Row numbers (n,) of this rank's tuples of a round of ``num_tuples``: of each whole global batch of
    ``batch_size`` tuples from tuple ``first_tuple`` on, the rank's contiguous batch_size / world rows (one process:
    every row of those batches; a last, partial batch is dropped)."""
    per_rank = batch_size // distributed.world_size()
    steps = max(0, (num_tuples - first_tuple) // batch_size)
    starts = first_tuple + np.arange(steps) * batch_size + distributed.rank() * per_rank  # (steps,)
    return (starts[:, None] + np.arange(per_rank)).reshape(-1)  # (steps * per_rank,)


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
