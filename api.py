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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from model.backbone import patch_grid
from model.checkpoint import CheckpointError, build_model
from model.correspondences import cross_graph_attention, stage_node_boxes
from model.local_features import node_coordinates
from model.network import ModelConfig, PRGSNetwork
from model.reranker import MIN_GRID_SIDE, match_probability
from places.images import BadImageError, checked_image_size, image_tensor, load_image, rgb_image
from util import PRGSError

logger = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image
COORDINATE_TOLERANCE = 1e-3  # |x - x_grid| allowed when reading a node's grid from its [x, y] (float16 round trips)


class InputError(PRGSError, ValueError):
    """Anything the API refuses: an input of the wrong type, rank, channels, dtype or size, non-finite values, a stage
    out of range, local features of mixed grids, an unreadable image, a checkpoint that cannot be loaded. The message
    says what was given and what is expected (docs/api.md#errors)."""


@dataclass
class Description:
    """What the network says about a batch of B images."""

    global_descriptors: torch.Tensor  # (B, D) float32, L2-normalised: compare with a dot product
    local_features: torch.Tensor | None  # (B, L, 3 + local_dim) reranker nodes [x, y, attention, f]; None global-only


class PRGS(nn.Module):
    """A PRGS network with the preprocessing it expects.

    forward(images (B, 3, H, W)) is the network's: (global (B, D), local (B, L, C)), or global (B, D) alone for a
    global-only model. ``image_size`` (H, W) is what preprocess resizes to (by default the size the model was built
    for; its transpose, e.g. (640, 480) for portrait photos, also reranks: the same region count). Every input is
    checked by the functions under "Input checks" below; what they refuse raises InputError.
    """

    def __init__(self, network: PRGSNetwork, image_size: tuple[int, int] | None = None, global_only: bool = False):
        super().__init__()
        self.network = network
        try:
            self.image_size = checked_image_size(image_size or network.config.image_size)
            self.grid = patch_grid(self.image_size, network.backbone.patch_size)
        except (ValueError, TypeError) as error:
            raise InputError(f"image_size: {error}") from error
        self.global_only = global_only

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, images: torch.Tensor | np.ndarray):
        """images (B, 3, H, W) float, preprocessed -> the network's output (checked as describe checks a batch)."""
        return self.network(self._float_batch(images), global_only=self.global_only)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """A path (decoded upright, EXIF orientation applied) or a PIL image of any mode PIL can make RGB -> (3, H, W)
        float32: bilinear resize to image_size, ImageNet normalisation. The same preprocessing as test.py and
        training."""
        try:
            if isinstance(image, Image.Image):
                return image_tensor(rgb_image(image, "the PIL image"), self.image_size)
            if isinstance(image, (str, Path)):
                return load_image(image, self.image_size)
        except BadImageError as error:
            raise InputError(str(error)) from error
        raise InputError(f"expected an image path or a PIL image, got {type(image).__name__}")

    @torch.inference_mode()
    def describe(self, images: Sequence[ImageInput] | torch.Tensor | np.ndarray, batch_size: int = 32) -> Description:
        """Global descriptors and local features of images: paths, PIL images, uint8 pixels (B, 3, H, W) or
        (3, H, W) (resized and normalised as preprocess does), or a preprocessed float (B, 3, H, W) batch; torch
        tensors or numpy arrays. Results are float32 on the CPU; batches of batch_size images run on the module's
        device."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        descriptors, local = [], []
        for batch in self._batches(images, batch_size):
            output = self.network(batch, global_only=self.global_only)  # (b, D) or ((b, D), (b, L, C))
            descriptors.append((output if self.global_only else output[0]).float().cpu())
            if not self.global_only:
                local.append(output[1].float().cpu())
        return Description(torch.cat(descriptors), None if self.global_only else torch.cat(local))

    @torch.inference_mode()
    def rerank(
        self, query_local: torch.Tensor | np.ndarray, candidates_local: torch.Tensor | np.ndarray
    ) -> torch.Tensor:
        """query_local (L, C) and candidates_local (K, L, C) from describe -> P(same place) (K,) on the CPU.

        The K candidates form one group, as in test.py: a candidate's score depends on the others (image graph)."""
        nodes, grid = self._group(query_local, candidates_local)  # (1, 1+K, L, C)
        return self.network.rerank(nodes[:, 0], nodes[:, 1:], grid)[0].cpu()  # (K,)

    @torch.inference_mode()
    def correspondences(
        self, query_local: torch.Tensor | np.ndarray, candidates_local: torch.Tensor | np.ndarray, stage: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the cross graph of ``stage`` (0: patches, 1: 3x3 regions, 2: multi-scale regions) matched.

        Returns (P(same place) (K,), attention (K, L_s, L_s) whose row i weighs the candidate's nodes for the query's
        node i, node boxes (L_s, 4) as pixel (x0, y0, x1, y1) in the frame of the nodes' image size), all on the CPU.
        See model/correspondences.py."""
        stages = len(self.network.reranker.crossnode_graph_layers)
        if isinstance(stage, bool) or not isinstance(stage, (int, np.integer)) or not 0 <= stage < stages:
            raise InputError(f"stage must be an int in [0, {stages - 1}] (0: patches, 1: regions, ...), got {stage!r}")
        nodes, grid = self._group(query_local, candidates_local)
        logits, attention = cross_graph_attention(self.network.reranker, nodes, grid, stages=(int(stage),))
        boxes = stage_node_boxes(grid, self.network.backbone.patch_size)[int(stage)]
        return match_probability(logits)[0].cpu(), attention[int(stage)][0].float().cpu(), boxes

    # -- Input checks: every method above takes its inputs through these ------------------------------------------
    def _batches(self, images, batch_size: int) -> Iterator[torch.Tensor]:
        """Checked images -> float32 batches (b, 3, H, W) on the module's device, preprocessed."""
        if isinstance(images, (torch.Tensor, np.ndarray)):
            pixels = image_array(images)  # (B, 3, H, W) uint8 or float32
            if pixels.dtype == torch.uint8:
                images = [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in pixels]  # RGB PIL
            else:
                for start in range(0, len(pixels), batch_size):
                    yield self._float_batch(pixels[start : start + batch_size])
                return
        if isinstance(images, (str, Path, Image.Image)) or not isinstance(images, Sequence):
            raise InputError(
                f"images must be a list of paths or PIL images, or a (B, 3, H, W) tensor or array, got "
                f"{type(images).__name__}"
                + (" (wrap a single image in a list)" if isinstance(images, str | Path) else "")
            )
        if len(images) == 0:
            raise InputError("describe() got no images")
        for start in range(0, len(images), batch_size):
            yield torch.stack([self.preprocess(image) for image in images[start : start + batch_size]]).to(self.device)

    def _float_batch(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """A preprocessed batch -> (B, 3, H, W) float32 on the module's device, its size checked."""
        images = image_array(images)
        if not images.is_floating_point():
            raise InputError(f"a preprocessed batch must be float, got {images.dtype} (describe takes uint8 pixels)")
        check_size(tuple(images.shape[-2:]), self.network, self.global_only)
        return images.to(self.device, torch.float32)

    def _group(self, query_local, candidates_local) -> tuple[torch.Tensor, tuple[int, int]]:
        """(L, C), (K, L, C) -> nodes (1, 1+K, L, C) float32 on the module's device, and the patch grid they were
        described on: the module's or its transpose, the same for every image of the group."""
        if self.global_only:
            raise InputError("this model was loaded global-only (prgs_global / global_only=True): it cannot rerank")
        channels = self.network.config.node_dim
        query = local_features(query_local, "query_local", "(L, C)", channels)[None]  # (1, L, C)
        candidates = local_features(candidates_local, "candidates_local", "(K, L, C)", channels)
        grids = list(dict.fromkeys([self.grid, self.grid[::-1]]))
        patch_size = self.network.backbone.patch_size
        grid = next((g for g in grids if bool(on_grid(query, g, patch_size).all())), None)
        if grid is None:
            raise InputError(
                f"query_local {tuple(query.shape[1:])} was not described at {self.image_size[0]}x{self.image_size[1]} "
                f"or its transpose (a {self.grid[0]}x{self.grid[1]} patch grid, [x, y] at the patch centres)"
            )
        odd = torch.nonzero(~on_grid(candidates, grid, patch_size)).flatten().tolist()
        if odd:
            raise InputError(
                f"candidates {odd[:5]} of candidates_local {tuple(candidates.shape)} were not described on the query's "
                f"{grid[0]}x{grid[1]} patch grid: rerank images described at one size (or its transpose) together"
            )
        nodes = torch.cat([query, candidates]).unsqueeze(0).to(self.device, torch.float32)  # (1, 1+K, L, C)
        try:
            self.network.reranker.check_input(nodes, grid)
        except ValueError as error:
            raise InputError(str(error)) from error
        return nodes, grid


def as_tensor(value, name: str) -> torch.Tensor:
    """A torch tensor or a numpy array of numbers -> a tensor (numpy arrays copied); InputError otherwise."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise InputError(f"{name} has numpy dtype {value.dtype}, expected numbers")
        return torch.from_numpy(np.array(value))
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} must be a torch tensor or a numpy array, got {type(value).__name__}")
    return value


def image_array(images) -> torch.Tensor:
    """Images (B, 3, H, W) or one image (3, H, W), uint8 pixels or float -> (B, 3, H, W) with B, H, W >= 1, float
    values finite; InputError naming the rank, the channels, the dtype or the values otherwise."""
    images = as_tensor(images, "images")
    shape = tuple(images.shape)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        hint = " (channels first: transpose an (H, W, 3) array)" if shape[-1:] == (3,) else ""
        raise InputError(f"images must be (B, 3, H, W) or (3, H, W) RGB, got shape {shape}{hint}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise InputError(f"images of dtype {images.dtype}: give uint8 pixels (0-255) or a preprocessed float batch")
    if min(images.shape[0], images.shape[2], images.shape[3]) == 0:
        raise InputError(f"images of shape {shape} hold no image or no pixel")
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise InputError("images hold NaN or infinite values")
    return images


def check_size(size: tuple[int, int], network: PRGSNetwork, global_only: bool) -> None:
    """InputError when a preprocessed batch of ``size`` (H, W) cannot run: sides not divisible by the patch size,
    or (for local features) a patch grid smaller than the reranker's minimum or than the kept nodes."""
    height, width = size
    patch_size = network.backbone.patch_size
    if height % patch_size or width % patch_size:
        raise InputError(
            f"a preprocessed batch of {height}x{width} images: sides must be multiples of the patch size {patch_size} "
            f"(give uint8 pixels, paths or PIL images to have them resized to model.image_size)"
        )
    kept = network.config.num_kept_nodes
    grid = (height // patch_size, width // patch_size)
    if not global_only and (min(grid) < MIN_GRID_SIDE or grid[0] * grid[1] < kept):
        raise InputError(
            f"{height}x{width} images give a {grid[0]}x{grid[1]} patch grid, too small for local features: at least "
            f"{MIN_GRID_SIDE}x{MIN_GRID_SIDE} patches and {kept} nodes (the model keeps {kept})"
        )


def local_features(value, name: str, shape: str, channels: int) -> torch.Tensor:
    """Local features of the rank ``shape`` names ("(L, C)" or "(K, L, C)"), every size >= 1, C == ``channels``,
    float and finite -> float32; InputError otherwise."""
    tensor = as_tensor(value, name)
    rank = shape.count(",") + 1
    if tensor.ndim != rank or 0 in tensor.shape:
        raise InputError(f"expected {name} {shape} with every size >= 1, got {tuple(tensor.shape)}")
    if tensor.shape[-1] != channels:
        raise InputError(
            f"{name} {tuple(tensor.shape)} has {tensor.shape[-1]} channels, expected {channels} ([x, y, attention] + "
            f"the model's {channels - 3}-d local features, as describe returns them)"
        )
    if not tensor.is_floating_point():
        raise InputError(f"{name} of dtype {tensor.dtype}: expected the float local features describe returns")
    if not bool(torch.isfinite(tensor).all()):
        raise InputError(f"{name} holds NaN or infinite values")
    return tensor.float()


def on_grid(nodes: torch.Tensor, grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """nodes (N, L, C) -> (N,) bool: every kept row (x > 0) carries the [x, y] of its patch on ``grid`` (h, w)
    (node_coordinates of an image of h x w patches); zeroed rows carry no position."""
    if nodes.shape[1] != grid[0] * grid[1]:
        return torch.zeros(len(nodes), dtype=torch.bool)
    image_size = (grid[0] * patch_size, grid[1] * patch_size)
    xy = node_coordinates(grid, patch_size, image_size, nodes.device)  # (L, 2)
    close = ((nodes[..., :2].float() - xy).abs() <= COORDINATE_TOLERANCE).all(-1)  # (N, L)
    return (close | (nodes[..., 0] <= 0)).all(-1)


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
    A checkpoint that cannot be loaded (missing, a folder, unreadable, mis-fitting or non-finite weights) raises
    InputError with the reason.
    """
    try:
        network, checkpoint = build_model(
            config or ModelConfig(), resume=weights, backbone_weights="auto", strict=strict
        )
    except CheckpointError as error:
        raise InputError(str(error)) from error
    if checkpoint is None and not global_only:
        logger.warning("no weights given: local_head and the reranker are untrained, their scores are random")
    elif checkpoint is not None and checkpoint.layout == "reference_global" and not global_only:
        logger.warning("%s holds a global model only: local_head and the reranker are untrained", weights)
    return PRGS(network, image_size, global_only).to(device).eval()
