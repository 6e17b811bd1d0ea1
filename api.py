"""The Python API (docs/api.md): load a PRGS checkpoint, preprocess images as the scripts do, describe them (global
descriptors and local features), rerank a query against candidates, and see what the cross graphs matched.

    import api
    model = api.load_model("best.pth")              # any checkpoint test.py --resume takes
    database = model.describe(["a.jpg", "b.jpg"])   # .global_descriptors (2, D), .local_features (2, L, C)
    query = model.describe(["q.jpg"])
    model.rerank(query.local_features[0], database.local_features)   # P(same place) of each candidate, (2,)

Everything runs on the module's device (``model.to("cuda")``) in inference mode. hubconf.py builds on this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from model.backbone import patch_grid
from model.checkpoint import build_model
from model.correspondences import cross_graph_attention, stage_node_boxes
from model.network import ModelConfig, PRGSNetwork
from model.reranker import match_probability
from places.images import checked_image_size, image_tensor, load_image

logger = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image


@dataclass
class Description:
    """What the network says about a batch of B images."""

    global_descriptors: torch.Tensor  # (B, D) float32, L2-normalised: compare with a dot product
    local_features: torch.Tensor | None  # (B, L, 3 + local_dim) reranker nodes [x, y, attention, f]; None global-only


class PRGS(nn.Module):
    """A PRGS network with the preprocessing it expects.

    forward(images (B, 3, H, W)) is the network's: (global (B, D), local (B, L, C)), or global (B, D) alone for a
    global-only model. ``image_size`` (H, W) is what preprocess resizes to (by default the size the model was built
    for; its transpose, e.g. (640, 480) for portrait photos, also reranks: the same region count).
    """

    def __init__(self, network: PRGSNetwork, image_size: tuple[int, int] | None = None, global_only: bool = False):
        super().__init__()
        self.network = network
        self.image_size = checked_image_size(image_size or network.config.image_size)
        self.grid = patch_grid(self.image_size)
        self.global_only = global_only

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, images: torch.Tensor):
        return self.network(images, global_only=self.global_only)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """A path (decoded upright, EXIF orientation applied) or an RGB PIL image -> (3, H, W) float32: bilinear
        resize to image_size, ImageNet normalisation. The same preprocessing as test.py and training."""
        if isinstance(image, Image.Image):
            return image_tensor(image.convert("RGB"), self.image_size)
        return load_image(image, self.image_size)

    @torch.inference_mode()
    def describe(self, images: Sequence[ImageInput] | torch.Tensor, batch_size: int = 32) -> Description:
        """Global descriptors and local features of images: paths, PIL images, or a preprocessed (B, 3, H, W) batch.
        Results are float32 on the CPU; batches of batch_size images run on the module's device."""
        if len(images) == 0:
            raise ValueError("describe() got no images")
        descriptors, local = [], []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = chunk if isinstance(chunk, torch.Tensor) else torch.stack([self.preprocess(i) for i in chunk])
            output = self(batch.to(self.device))  # (b, D) or ((b, D), (b, L, C))
            descriptors.append((output if self.global_only else output[0]).float().cpu())
            if not self.global_only:
                local.append(output[1].float().cpu())
        return Description(torch.cat(descriptors), None if self.global_only else torch.cat(local))

    @torch.inference_mode()
    def rerank(self, query_local: torch.Tensor, candidates_local: torch.Tensor) -> torch.Tensor:
        """query_local (L, C) and candidates_local (K, L, C) from describe -> P(same place) (K,) on the CPU.

        The K candidates form one group, as in test.py: a candidate's score depends on the others (image graph)."""
        query, candidates = self._group(query_local, candidates_local)
        return self.network.rerank(query, candidates, grid=self.grid)[0].cpu()  # (K,)

    @torch.inference_mode()
    def correspondences(
        self, query_local: torch.Tensor, candidates_local: torch.Tensor, stage: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the cross graph of ``stage`` (0: patches, 1: 3x3 regions, 2: multi-scale regions) matched.

        Returns (P(same place) (K,), attention (K, L_s, L_s) whose row i weighs the candidate's nodes for the query's
        node i, node boxes (L_s, 4) as pixel (x0, y0, x1, y1) in the image_size frame), all on the CPU.
        See model/correspondences.py."""
        query, candidates = self._group(query_local, candidates_local)
        nodes = torch.cat([query.unsqueeze(1), candidates], dim=1)  # (1, 1+K, L, C)
        logits, attention = cross_graph_attention(self.network.reranker, nodes, self.grid, stages=(stage,))
        boxes = stage_node_boxes(self.grid, self.network.backbone.patch_size)[stage]
        return match_probability(logits)[0].cpu(), attention[stage][0].float().cpu(), boxes

    def _group(self, query_local: torch.Tensor, candidates_local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, C), (K, L, C) -> (1, L, C), (1, K, L, C) on the module's device."""
        if self.global_only:
            raise ValueError("this model was loaded global-only (prgs_global / global_only=True): it cannot rerank")
        if query_local.ndim != 2 or candidates_local.ndim != 3:
            raise ValueError(
                f"expected query_local (L, C) and candidates_local (K, L, C), got {tuple(query_local.shape)} and "
                f"{tuple(candidates_local.shape)}"
            )
        return query_local.to(self.device)[None], candidates_local.to(self.device)[None]


def load_model(
    weights: str | Path | None = None,
    *,
    global_only: bool = False,
    image_size: tuple[int, int] | None = None,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
    strict: bool = True,
) -> PRGS:
    """A PRGS model in eval mode on ``device``, from a checkpoint of any layout test.py --resume takes (this
    project's rebuild their own configuration; the reference's use ``config``, default the reference's settings).

    weights None: ``config`` with the backbone's ImageNet weights when timm's or torchvision's local cache has them
    (random otherwise) and an untrained local_head and reranker; nothing is downloaded. global_only: forward and
    describe give global descriptors only (e.g. for R2Former's global checkpoint). strict: see load_weights.
    """
    network, checkpoint = build_model(config or ModelConfig(), resume=weights, backbone_weights="auto", strict=strict)
    if checkpoint is None and not global_only:
        logger.warning("no weights given: local_head and the reranker are untrained, their scores are random")
    elif checkpoint is not None and checkpoint.layout == "reference_global" and not global_only:
        logger.warning("%s holds a global model only: local_head and the reranker are untrained", weights)
    return PRGS(network, image_size, global_only).to(device).eval()
