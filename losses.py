"""The training objectives: what a step of each stage (--train_stage) minimises on a batch of tuples.

    reranker  0.5 * CE(positive, "same") + 0.5 * mean over negatives of CE(negative, "different") on the reranker's
              logits (``rerank_loss``)
    full      the same plus the triplet loss on the global descriptors
    global    the triplet loss alone (``triplet_loss``)

Loss scale (a deliberate choice): both classes of the reranker loss weigh the same, as in the reference, but
without the reference's extra 1/train_batch_size factor. Under AdamW a constant factor on the loss leaves the
updates unchanged (up to eps), so learning rates transfer from the reference. The triplet term is the mean over all
(query, positive, negative) triplets, as in the reference, and is simply added.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from model.network import PRGSNetwork


class BackboneOutputsCache(Protocol):
    """What ``TupleObjective`` needs of a cache of the frozen backbone's outputs (extraction.FrozenBackboneCache)."""

    def local(self, model: PRGSNetwork, image_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Nodes (n, L, C) of the images ``image_ids`` (global indices), through the current local_head."""
        ...


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
        cache: BackboneOutputsCache | None,
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
