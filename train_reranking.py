"""Train PRGS: mine tuples, optimise, validate every epoch, keep last/best checkpoints, stop early, test the best.

    python train_reranking.py --dataset_name msls --datasets_folder /data --resume resume/msls_v2_deits.pth \\
        --mining global --hard_negatives result/msls_hard_negatives.npz ...   (train_reranking.sh has the recipes)

Stages (--train_stage):
    reranker  backbone frozen; local_head + reranker trained with cross-entropy on positive-vs-negative logits
    full      also the backbone, adding a triplet loss on the global descriptors
    global    the global descriptor alone, triplet loss (what the reference's train_global_retrieval.sh meant to do)

Loss scale (a deliberate choice): the reranker loss is 0.5 * CE(positive, "same") + 0.5 * mean over negatives of
CE(negative, "different"), i.e. both classes weigh the same, as in the reference, but without the reference's extra
1/train_batch_size factor (SPEC 3.5). Under AdamW a constant factor on the loss leaves the updates unchanged (up to
eps), so learning rates transfer from the reference. The triplet term is the mean over all (query, positive,
negative) triplets, as in the reference, and is simply added.

Checkpoints (logs/<save_dir>/<timestamp>/last.pth and best.pth, written atomically) hold the model, the optimiser,
the schedule position, the epoch/round/step, the best metric, the patience counter, the RNG states, the current
mining round's tuples and the arguments: --resume last.pth continues exactly where it stopped.
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

import parser as prgs_parser
import util
from datasets_ws import BaseDataset, PlaceIndex, TupleDataset, load_split
from mining import TupleMiner, Tuples, compute_global_descriptors, file_sha1, load_hard_negatives
from model.backbone import patch_grid
from model.network import PRGSNetwork
from test import build_results, eval_settings, evaluate, recalls_by_name, recalls_table, write_outputs

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
    """Learning-rate multiplier for an epoch: linear warm-up from 0.1, then step decay or cosine (SPEC 3.6)."""
    if epoch < args.warmup_epochs:
        progress = epoch / args.warmup_epochs
        return 0.1 * (1 - progress) + progress
    if args.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / args.epochs_num))
    return args.lr_step_gamma ** ((epoch - args.warmup_epochs) // args.lr_step_epochs)


def tuple_loss(model: PRGSNetwork, images: torch.Tensor, stage: str, margin: float, grid: tuple[int, int]
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """images (B, T, 3, H, W), T = 2 + negs in the order query, positive, negatives -> (loss, its parts)."""
    batch, group = images.shape[:2]
    flat = images.flatten(0, 1)                                                    # (B*T, 3, H, W)
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
    logits = model.rerank_logits(local[:, 0], local[:, 1:], grid).float()          # (B, 1 + negs, 2)
    positive = F.cross_entropy(logits[:, 0], torch.ones(batch, dtype=torch.long, device=logits.device))
    negatives = F.cross_entropy(logits[:, 1:].flatten(0, 1),
                                torch.zeros(batch * (group - 2), dtype=torch.long, device=logits.device))
    return 0.5 * positive + 0.5 * negatives


class FrozenBackboneCache:
    """Backbone outputs (tokens, attention) of every training image, computed once: with the backbone frozen
    (stage reranker) they never change, so each step only runs local_head and the reranker."""

    def __init__(self, model: PRGSNetwork, index: PlaceIndex, image_size: tuple[int, int], device: torch.device,
                 batch_size: int, num_workers: int, precision: str):
        dataset = BaseDataset(index, image_size)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                             generator=torch.Generator())
        descriptors, tokens, attention = [], [], []
        model.eval()
        with torch.inference_mode():
            for images, _ in tqdm(loader, desc="caching frozen backbone outputs", unit="batch", leave=False):
                with util.autocast(device, precision):
                    out = model.backbone.forward_prgs(images.to(device), with_local=True)
                descriptors.append(out.global_descriptor.float().cpu())
                tokens.append(out.tokens.float().cpu())
                attention.append(out.attention.float().cpu())
        self.descriptors = torch.cat(descriptors).numpy()  # (N, D), for mining
        self.tokens = torch.cat(tokens)                     # (N, L, C)
        self.attention = torch.cat(attention)               # (N, L)
        self.image_size = tuple(image_size)
        logger.info("cached frozen backbone outputs of %d images (%.0f MB)", len(self.tokens),
                    (self.tokens.numel() + self.attention.numel()) * 4 / 2 ** 20)

    def local(self, model: PRGSNetwork, image_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Nodes (n, L, C) of the images ``image_ids`` (global indices), through the current local_head."""
        return model.local_nodes(self.tokens[image_ids].to(device), self.attention[image_ids].to(device),
                                 self.image_size)


def triplet_loss(descriptors: torch.Tensor, margin: float) -> torch.Tensor:
    """descriptors (B, T, D) as query, positive, negatives -> mean triplet margin loss over the B*(T-2) triplets."""
    negatives = descriptors[:, 2:]
    anchors = descriptors[:, :1].expand_as(negatives)
    positives = descriptors[:, 1:2].expand_as(negatives)
    return F.triplet_margin_loss(anchors.flatten(0, 1).float(), positives.flatten(0, 1).float(),
                                 negatives.flatten(0, 1).float(), margin=margin, p=2)


# ----------------------------------------------------------------------------------------------------------------
# Training state and checkpoints

@dataclass
class TrainingState:
    """Where training is and what it has seen. Position = the next (epoch, round, step in round) to run."""
    epoch: int = 0
    round: int = 0
    step_in_round: int = 0
    global_step: int = 0
    best_metric: float = -1.0
    best_epoch: int = -1
    not_improved: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    history: list[dict] = field(default_factory=list)
    tuples: Tuples | None = None          # the current round's tuples while it is in progress

    def to_checkpoint(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k != "tuples"}
        state["tuples"] = self.tuples.state() if self.tuples is not None else None
        return state

    @classmethod
    def from_checkpoint(cls, state: dict) -> "TrainingState":
        state = dict(state)
        tuples = state.pop("tuples")
        return cls(**state, tuples=Tuples.from_state(tuples) if tuples is not None else None)


def save_training_checkpoint(path: Path, model: PRGSNetwork, optimizer: torch.optim.Optimizer, state: TrainingState,
                             miner: TupleMiner, args) -> None:
    previous = miner.previous_negatives
    queries = torch.tensor(sorted(previous), dtype=torch.long)
    negatives = torch.from_numpy(np.stack([previous[int(q)] for q in queries])) if len(queries) else torch.empty(0)
    util.save_model(model, path, training_state={
        "state": state.to_checkpoint(), "optimizer": optimizer.state_dict(),
        "scheduler": {"schedule": args.lr_schedule, "epoch": state.epoch, "lr_factor": lr_factor(state.epoch, args)},
        "rng": util.rng_states(), "previous_negatives": {"queries": queries, "negatives": negatives},
    }, args=util.plain_args(args))


def restore_training(checkpoint, optimizer: torch.optim.Optimizer, miner: TupleMiner) -> TrainingState:
    """Optimizer, miner, RNG and position from one of our checkpoints."""
    training = checkpoint.state["training_state"]
    optimizer.load_state_dict(training["optimizer"])
    previous = training["previous_negatives"]
    miner.previous_negatives = {int(q): n.numpy() for q, n in zip(previous["queries"], previous["negatives"])}
    util.set_rng_states(training["rng"])
    return TrainingState.from_checkpoint(training["state"])


# ----------------------------------------------------------------------------------------------------------------
# The loop

def run_round(model, optimizer, trainable, train_index: PlaceIndex, tuples: Tuples, state: TrainingState, args,
              device: torch.device, grid: tuple[int, int], checkpoint, cache: FrozenBackboneCache | None) -> bool:
    """Train on one mining round from state.step_in_round. Returns False when --max_steps stopped it."""
    batch_size = args.train_batch_size
    start = state.step_in_round * batch_size
    dataset = TupleDataset(train_index, tuples.queries[start:], tuples.positives[start:], tuples.negatives[start:],
                           args.resize)
    if cache is None:
        batches = torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=True,
                                              num_workers=args.num_workers, pin_memory=device.type == "cuda",
                                              generator=torch.Generator())
    else:  # image ids only: the cache holds the backbone outputs
        ids = torch.from_numpy(dataset.image_ids)
        batches = [(None, ids[i:i + batch_size]) for i in range(0, len(ids) - batch_size + 1, batch_size)]
    set_train_mode(model, args.train_stage)
    bar = tqdm(batches, desc=f"epoch {state.epoch:02d} round {state.round}", unit="step", leave=False)
    for images, image_ids in bar:
        if args.max_steps and state.global_step >= args.max_steps:
            checkpoint()
            return False
        with util.autocast(device, args.precision):
            if cache is None:
                loss, parts = tuple_loss(model, images.to(device, non_blocking=True), args.train_stage, args.margin,
                                         grid)
            else:
                local = cache.local(model, image_ids.flatten(), device)
                loss = rerank_loss(model, local.reshape(*image_ids.shape, *local.shape[1:]), grid)
                parts = {"rerank_ce": float(loss.detach())}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        optimizer.step()
        state.global_step += 1
        state.step_in_round += 1
        state.loss_sum += float(loss.detach())
        state.loss_count += 1
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", mean=f"{state.loss_sum / state.loss_count:.4f}")
        if state.global_step <= 2 or state.global_step % 100 == 0:
            logger.debug("step %d: loss %.5f %s", state.global_step, float(loss.detach()), parts)
        if args.max_steps and state.global_step >= args.max_steps:
            checkpoint()
            return False
        if args.checkpoint_every_steps and state.global_step % args.checkpoint_every_steps == 0:
            checkpoint()
    return True


def main(argv: list[str] | None = None) -> dict:
    args = prgs_parser.parse_train_args(argv)
    output_folder = util.start_run(args)
    started = time.perf_counter()
    util.set_seed(args.seed)
    device = util.resolve_device(args.device)
    grid = patch_grid(args.resize)

    split_options = dict(positive_dist_threshold=args.val_positive_dist_threshold, skip_bad_images=args.skip_bad_images,
                         num_workers=args.num_workers, msls_cache_dir=args.msls_cache_dir)
    train_index = load_split(args.datasets_folder, args.dataset_name, "train",
                             train_positive_dist_threshold=args.train_positives_dist_threshold, **split_options)
    val_index = load_split(args.datasets_folder, args.dataset_name, "val", **split_options)
    test_index = load_split(args.datasets_folder, args.dataset_name, args.test_split, **split_options)

    model, checkpoint = util.build_model(args.model_config, resume=args.resume,
                                         backbone_weights=args.backbone_weights, strict=not args.non_strict_resume)
    model = model.to(device)
    trainable = configure_stage(model, args.train_stage)
    logger.info("stage %s: %d trainable parameters of %d (%s, input %dx%d)", args.train_stage,
                util.count_parameters(model, trainable_only=True), util.count_parameters(model),
                model.config.backbone, *args.resize)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)

    hard_negatives = None
    if args.mining == "global":
        hint = (f"python pre_compute_mining.py --dataset_name {args.dataset_name} --datasets_folder "
                f"{args.datasets_folder} --resume GLOBAL_MODEL --output {args.hard_negatives}")
        hard_negatives, metadata = load_hard_negatives(args.hard_negatives, train_index, args.neg_hardness, hint)
        logger.info("hard negatives from %s (mined %s with %s)", args.hard_negatives, metadata.get("created"),
                    metadata.get("model_checkpoint"))
        if args.resume and metadata.get("model_checkpoint_sha1") not in (None, file_sha1(args.resume)):
            logger.warning("the hard negatives were mined with another model (%s) than --resume %s: they may not be "
                           "the hardest for this one. Rebuild them with: %s", metadata.get("model_checkpoint"),
                           args.resume, hint.replace("GLOBAL_MODEL", args.resume))
    miner = TupleMiner(train_index, args.mining, args.negs_num_per_query, args.neg_hardness, args.neg_samples_num,
                       hard_negatives)

    state = TrainingState()
    resumed_stage = (checkpoint.state.get("args") or {}).get("train_stage") if checkpoint is not None else None
    if checkpoint is not None and "training_state" in checkpoint.state and resumed_stage == args.train_stage:
        state = restore_training(checkpoint, optimizer, miner)
        logger.info("resuming %s exactly: epoch %d, round %d, step %d (%d steps done)", checkpoint.path, state.epoch,
                    state.round, state.step_in_round, state.global_step)
    elif checkpoint is not None:
        logger.info("--resume %s (%s layout%s) initialises the weights only; training starts at epoch 0",
                    checkpoint.path, checkpoint.layout, f", stage {resumed_stage}" if resumed_stage else "")

    settings = eval_settings(args, device)
    with_rerank = args.train_stage != "global"
    results = {"stage": args.train_stage, "datasets": {"train": train_index.summary(), "val": val_index.summary(),
                                                        "test": test_index.summary()}}
    if args.test_before_training and state.global_step == 0:
        before = evaluate(model, test_index, settings, output_folder / "work", with_rerank=with_rerank)
        results["test_before_training"] = recalls_by_name(before)
        logger.info("test before training (%s):\n%s", test_index.summary(), recalls_table(before))

    cache = None
    if args.cache_frozen_backbone:
        cache = FrozenBackboneCache(model, train_index, args.resize, device, args.infer_batch_size, args.num_workers,
                                    args.precision)

    def describe(image_ids: np.ndarray) -> np.ndarray:
        if cache is not None:
            return cache.descriptors[image_ids]
        return compute_global_descriptors(model, train_index, image_ids, args.resize, device, args.infer_batch_size,
                                          args.num_workers, args.precision, "mining descriptors")

    def write_last() -> None:
        save_training_checkpoint(output_folder / "last.pth", model, optimizer, state, miner, args)

    rounds_per_epoch = args.queries_per_epoch // args.cache_refresh_rate
    queries_per_round = min(args.cache_refresh_rate, train_index.queries_num)
    if queries_per_round < args.cache_refresh_rate:
        logger.warning("--cache_refresh_rate %d is larger than the %d training queries: each round uses all of them",
                       args.cache_refresh_rate, train_index.queries_num)
    stopped = "epochs_num"
    while state.epoch < args.epochs_num:
        epoch_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(state.epoch, args)
        while state.round < rounds_per_epoch:
            if state.tuples is None:
                rng = np.random.default_rng([args.seed, state.epoch, state.round])
                queries = np.sort(rng.choice(train_index.queries_num, queries_per_round, replace=False))
                state.tuples = miner.mine(queries, rng, describe, global_model_frozen=args.train_stage == "reranker")
            if not run_round(model, optimizer, trainable, train_index, state.tuples, state, args, device, grid,
                             write_last, cache):
                stopped = "max_steps"
                break
            state.round, state.step_in_round, state.tuples = state.round + 1, 0, None
        if stopped == "max_steps":
            break
        validation = evaluate(model, val_index, settings, output_folder / "work", with_rerank=with_rerank)
        metric = (validation.reranked_recalls if with_rerank else validation.global_recalls)[args.recall_values[0]]
        improved = metric > state.best_metric
        mean_loss = state.loss_sum / max(1, state.loss_count)
        state.history.append({"epoch": state.epoch, "loss": mean_loss, "lr": optimizer.param_groups[0]["lr"],
                              "val": recalls_by_name(validation), "seconds": round(time.perf_counter() - epoch_start, 1)})
        logger.info("epoch %02d: mean loss %.5f, lr %.2e, %.0f s; validation on %s:\n%s", state.epoch, mean_loss,
                    optimizer.param_groups[0]["lr"], time.perf_counter() - epoch_start, val_index.summary(),
                    recalls_table(validation))
        if improved:
            logger.info("improved: R@%d %.2f -> %.2f", args.recall_values[0], max(state.best_metric, 0), metric)
            state.best_metric, state.best_epoch, state.not_improved = metric, state.epoch, 0
        else:
            state.not_improved += 1
            logger.info("not improved (%d / %d): R@%d %.2f, best %.2f at epoch %d", state.not_improved, args.patience,
                        args.recall_values[0], metric, state.best_metric, state.best_epoch)
        state.epoch, state.round, state.loss_sum, state.loss_count = state.epoch + 1, 0, 0.0, 0
        write_last()
        if improved:
            util.save_model(model, output_folder / "best.pth", metrics=state.history[-1], args=util.plain_args(args))
        _save_curves(output_folder, state.history, with_rerank)
        if state.not_improved >= args.patience:
            stopped = "early_stopping"
            logger.info("early stopping: %d epochs without improvement", state.not_improved)
            break

    results.update({"stopped": stopped, "epochs_trained": state.epoch, "global_step": state.global_step,
                    "best": {"epoch": state.best_epoch, f"val_{'reranked' if with_rerank else 'global'}_R@"
                             f"{args.recall_values[0]}": state.best_metric},
                    "history": state.history,
                    "checkpoints": {"last": str(output_folder / "last.pth"),
                                    "best": str(output_folder / "best.pth") if state.best_epoch >= 0 else None}})
    if stopped != "max_steps" and state.best_epoch >= 0:
        best = util.open_checkpoint(output_folder / "best.pth")
        util.load_weights(model, best)
        test_started = time.perf_counter()
        after = evaluate(model, test_index, settings, output_folder / "work", with_rerank=with_rerank)
        results["test"] = recalls_by_name(after)
        test_results = build_results(args, args.test_split, test_index, model, best, after, device,
                                     time.perf_counter() - test_started)
        write_outputs(args, output_folder / "test", test_index, after, test_results)
        logger.info("test of the best model (epoch %d) on %s:\n%s", state.best_epoch, test_index.summary(),
                    recalls_table(after))
        if "test_before_training" in results:
            _log_before_after(results, args.recall_values)
    results.update({"seconds": round(time.perf_counter() - started, 1), "model": model.config.to_dict(),
                    "configuration": util.plain_args(args)})
    (output_folder / "results.json").write_text(json.dumps(results, indent=2))
    logger.info("results: %s", output_folder / "results.json")
    return results


def _log_before_after(results: dict, recall_values: list[int]) -> None:
    first = f"R@{recall_values[0]}"
    before, after = results["test_before_training"], results["test"]
    lines = [f"{'test ' + first:32}{'global':>10}{'reranked':>10}"]
    if before["global"] is None:
        return  # no ground truth on this split (MSLS test)
    for label, values in (("before training", before), ("after training", after)):
        lines.append(f"{label:32}{values['global'][first]:10.2f}{values['reranked'][first]:10.2f}")
    logger.info("\n".join(lines))


def _save_curves(output_folder: Path, history: list[dict], with_rerank: bool) -> None:
    from visualize import save_training_curves
    first = next(iter(history[0]["val"]["global"]))
    recalls = {"global": [h["val"]["global"][first] for h in history]}
    if with_rerank:
        recalls["reranked"] = [h["val"]["reranked"][first] for h in history]
    save_training_curves(output_folder / "training_curves.png", [h["epoch"] for h in history],
                         [h["loss"] for h in history], recalls)


if __name__ == "__main__":
    util.run_entry_point(main)
