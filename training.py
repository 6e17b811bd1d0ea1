"""Training: mine tuples, optimise, validate every epoch, keep last/best checkpoints, stop early, test the best.
train_reranking.py drives a ``Trainer``; train_reranking.sh has the recipes.

Stages (--train_stage):
    reranker  backbone frozen; local_head + reranker trained with cross-entropy on positive-vs-negative logits
    full      also the backbone, adding a triplet loss on the global descriptors
    global    the global descriptor alone, triplet loss (what the reference's train_global_retrieval.sh meant to do)

Beside the loop: losses.py (what each stage minimises, and the loss scale), training_state.py (the state, the
learning-rate schedule, last.pth for an exact --resume), training_report.py (the final test, results.json).

Several processes (torchrun, docs/distributed.md): --train_batch_size is the global batch; each rank takes its
contiguous share of every batch and DistributedDataParallel averages the gradients, so a step equals one process's
step on the whole batch up to float rounding. Mining descriptors, the frozen-backbone cache and validation are split
across the ranks and gathered; every rank then holds the same state, and rank 0 alone writes files.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.utils.data
from tqdm import tqdm

import distributed
import runs
import util
from config import eval_settings, forward_precision, shortlist_settings
from datasets_ws import TupleDataset
from evaluation import Evaluation, evaluate
from extraction import ExtractionSettings, FrozenBackboneCache, global_descriptors
from losses import TupleObjective
from mining import MiningError, TupleMiner, Tuples, load_hard_negatives
from model.backbone import patch_grid
from model.checkpoint import LoadedCheckpoint, load_weights, open_checkpoint, save_model
from model.network import PRGSNetwork
from outputs import recalls_by_name, recalls_table
from places.index import DatasetError, PlaceIndex
from retrieval import ShortlistSource, spec_record
from retrievers import OWN_MODEL
from training_report import TrainingReport, save_curves
from training_state import lr_factor, save_training_checkpoint, start_or_resume

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Stage set-up


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


def hard_negatives_for(args, train: PlaceIndex, source: ShortlistSource) -> np.ndarray | None:
    """The --hard_negatives file's list for --mining global (checked against the training split ``train``; its
    provenance logged, with a warning when another model than the one making the shortlist mined it: --global_model
    when given, else --resume), else None."""
    if args.mining != "global":
        return None
    retriever = "" if source.retriever is None else f" --global_model {args.global_model}"
    hint = (
        f"python3 pre_compute_mining.py --dataset_name {args.dataset_name} --datasets_folder "
        f"{args.datasets_folder} --resume GLOBAL_MODEL{retriever} --output {args.hard_negatives}"
    )
    hard_negatives, metadata = load_hard_negatives(args.hard_negatives, train, args.neg_hardness, hint)
    mined_with = metadata.get("global_model") or OWN_MODEL  # files made before --global_model: PRGS's own
    logger.info(
        "hard negatives from %s (mined %s with %s%s)",
        args.hard_negatives,
        metadata.get("created"),
        metadata.get("model_checkpoint"),
        "" if mined_with == OWN_MODEL else f", global model {mined_with['name']}",
    )
    if source.retriever is not None:
        if mined_with != json.loads(json.dumps(spec_record(source.retriever.spec))):  # as the file holds it
            logger.warning(
                "the hard negatives were mined with another global model (%s) than --global_model %s: they may "
                "not be the ones it confuses. Rebuild them with: %s",
                mined_with if mined_with == OWN_MODEL else mined_with["name"],
                args.global_model,
                hint.replace("GLOBAL_MODEL", str(args.resume)),
            )
    elif mined_with != OWN_MODEL or (
        args.resume and metadata.get("model_checkpoint_sha1") not in (None, util.file_sha1(args.resume))
    ):
        logger.warning(
            "the hard negatives were mined with another model (%s) than --resume %s: they may not be "
            "the hardest for this one. Rebuild them with: %s",
            metadata.get("model_checkpoint") if mined_with == OWN_MODEL else mined_with["name"],
            args.resume,
            hint.replace("GLOBAL_MODEL", str(args.resume)),
        )
    return hard_negatives


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


# ----------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainingSplits:
    train: PlaceIndex
    val: PlaceIndex  # validated every epoch; selects the best epoch
    test: PlaceIndex  # --test_split: the best model's final test


class Trainer:
    """One training run: the model and what trains it (optimiser, miner, frozen-backbone cache), where training is
    (``state``, training_state.py), and the run's outputs (``report``, training_report.py; checkpoints in
    ``run.folder``)."""

    def __init__(
        self, model: PRGSNetwork, checkpoint: LoadedCheckpoint | None, splits: TrainingSplits, args, run: runs.Run
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
        self.source = ShortlistSource.open(shortlist_settings(args), self.device, forward_precision(args, self.device))
        self.optimizer = torch.optim.AdamW(self.trainable, lr=args.lr, weight_decay=args.weight_decay)
        self.miner = TupleMiner(
            splits.train,
            args.mining,
            args.negs_num_per_query,
            args.neg_hardness,
            args.neg_samples_num,
            hard_negatives_for(args, splits.train, self.source),
        )
        self.state = start_or_resume(checkpoint, self.optimizer, self.miner, args, run)
        self.steps_at_start = self.state.global_step
        self.settings = eval_settings(args, self.device)
        self.cache: FrozenBackboneCache | None = None
        self.objective: torch.nn.Module | None = None  # TupleObjective, wrapped for several ranks; made by train()
        self.train_seconds = 0.0  # in mining rounds' steps (data loading included), for results.json's throughput
        datasets = {name: getattr(splits, name).summary() for name in ("train", "val", "test")}
        self.report = TrainingReport(args, datasets, splits.test, self.with_rerank, run.folder)

    def _evaluate(self, index: PlaceIndex) -> Evaluation:
        """The current weights on a split (validation or test), as test.py evaluates (the shortlist from
        --global_model's descriptors when given)."""
        return evaluate(
            self.model,
            index,
            self.settings,
            self.run.scratch_folder(),
            with_rerank=self.with_rerank,
            source=self.source,
        )

    def test_before_training(self) -> None:
        """With --test_before_training on a fresh start: the test split's recalls before any step."""
        if self.args.test_before_training and self.state.global_step == 0:
            self.report.before_training(self._evaluate(self.splits.test))

    def train(self) -> str:
        """Epochs until --epochs_num, early stopping or --max_steps; returns which of the three stopped it."""
        args = self.args
        if args.cache_frozen_backbone:
            self.cache = FrozenBackboneCache(self.model, self.splits.train, self._extraction_settings())
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
        """Global descriptors (n, D) of training images (global indices), for mining: --global_model's when given
        (the negatives the shortlist's retriever confuses), else the network's."""
        if self.cache is not None and self.source.retriever is None:
            return self.cache.descriptors[image_ids]
        loop, retriever = self._extraction_settings(), self.source.retriever
        return global_descriptors(self.model, self.splits.train, image_ids, loop, "mining descriptors", retriever)

    def _extraction_settings(self) -> ExtractionSettings:
        args = self.args
        return ExtractionSettings(
            args.resize, self.device, args.infer_batch_size, args.num_workers, self.settings.precision
        )

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
        with util.autocast(self.device, self.settings.precision):  # the network's forward: extraction's precision
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
        validation = self._evaluate(self.splits.val)
        metric = (validation.reranked_recalls if self.with_rerank else validation.global_recalls)[args.recall_values[0]]
        mean_loss = state.loss_sum / max(1, state.loss_count)
        lr = self.optimizer.param_groups[0]["lr"]
        seconds = time.perf_counter() - epoch_start
        record = {
            "epoch": state.epoch,
            "loss": mean_loss,
            "lr": lr,
            "val": recalls_by_name(validation),
            "seconds": round(seconds, 1),
        }
        logger.info(
            "epoch %02d: mean loss %.5f, lr %.2e, %.0f s; validation on %s:\n%s",
            state.epoch,
            mean_loss,
            lr,
            seconds,
            self.splits.val.summary(),
            recalls_table(validation),
        )
        improved = state.end_epoch(metric, record, args.recall_values[0], args.patience)
        self.save_last()
        if distributed.is_main():
            if improved:
                best = self.run.folder / "best.pth"
                save_model(self.model, best, metrics=state.history[-1], args=runs.plain_args(args))
            save_curves(self.run.folder / "training_curves.png", state.history, self.with_rerank)
        if improved:
            self.run.note("best.pth", f"epoch {state.best_epoch}, val R@{args.recall_values[0]} {metric:.2f}")
        if state.not_improved >= args.patience:
            logger.info("early stopping: %d epochs without improvement", state.not_improved)
            return True
        return False

    def test_best(self, stopped: str) -> None:
        """The best epoch's weights on the test split, with test.py's outputs in <run>/test/ (not after
        --max_steps, nor when no epoch finished)."""
        if stopped == "max_steps" or self.state.best_epoch < 0:
            return
        distributed.barrier()  # rank 0 has written best.pth
        if not (self.run.folder / "best.pth").is_file():
            self.report.no_best_checkpoint(self.state.best_epoch)
            return
        best = open_checkpoint(self.run.folder / "best.pth")
        load_weights(self.model, best)
        test_started = time.perf_counter()
        after = self._evaluate(self.splits.test)
        seconds = time.perf_counter() - test_started
        self.report.best_tested(after, self.model, best, self.device, seconds, self.state.best_epoch)

    def write_results(self, stopped: str) -> dict:
        """results.json (docs/outputs.md) in the run folder (written by rank 0); returns it."""
        steps = self.state.global_step - self.steps_at_start
        throughput = {
            "world_size": distributed.world_size(),
            "global_batch": self.args.train_batch_size,
            "per_process_batch": self.per_rank_batch,
            "steps_per_second": round(steps / max(self.train_seconds, 1e-9), 4),
        }
        return self.report.write(stopped, self.state, self.model, throughput, self.run.seconds())
