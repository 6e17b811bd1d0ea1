"""PRGSNetwork: backbone + ``local_head`` + reranker, configured by a ModelConfig that checkpoints carry."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from model.backbone import BACKBONES, build_backbone, patch_grid
from model.local_features import NODE_PREFIX_DIM, build_nodes, default_num_kept_nodes
from model.reranker import PLAIN, GraphReranker, RerankKernel, match_probability, num_regions

INPUT_NORMS = ("imagenet", "per_image")
LOCAL_HEAD_INITS = ("reference", "xavier")


def standardize_images(images: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """images (B, 3, H, W) -> the same with each image's channels at zero mean and unit variance.

    A change of exposure or a colour cast (a gain and an offset per channel, what the toy world's dusk and night do)
    leaves the result unchanged, so a backbone trained for minutes does not have to learn that invariance.
    """
    flat = images.float().flatten(2)  # (B, 3, H*W)
    mean, std = flat.mean(-1), flat.std(-1)  # (B, 3) each
    return (images - mean[..., None, None].to(images.dtype)) / (std[..., None, None].to(images.dtype) + eps)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a PRGS network (checkpoints store it with ``to_dict``)."""

    backbone: str = "deit_small"
    image_size: tuple[int, int] = (480, 640)  # (H, W) the model is built for; sets the grid and region count
    fc_output_dim: int = 256  # global descriptor size
    local_dim: int = 128  # local descriptor size f; nodes have 3 + local_dim channels
    num_kept_nodes: int | None = None  # nodes kept per image; None -> 5/6 of the grid (1000 of 1200)
    temperature: float = 0.5  # graph softmax temperature
    finetune_backbone: bool = False  # let the reranker's gradients reach the backbone through local_head
    input_norm: str = "imagenet"  # "per_image": also standardise each image's channels (see standardize_images)
    # a fresh local_head's weights: "reference" N(0, 0.01), or "xavier" uniform like the reranker's own Linears
    # (docs/toy_world.md: the scale of the node descriptors sets how sharp the graph attention starts)
    local_head_init: str = "reference"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        self.image_size = tuple(int(v) for v in self.image_size)
        grid = patch_grid(self.image_size)
        num_regions(grid)  # a grid too small for the reranker fails here, with its own message
        if self.num_kept_nodes is None:
            self.num_kept_nodes = default_num_kept_nodes(grid[0] * grid[1])
        if not 0 < self.num_kept_nodes <= grid[0] * grid[1]:
            raise ValueError(
                f"num_kept_nodes must be in [1, {grid[0] * grid[1]}] for {self.image_size[0]}x"
                f"{self.image_size[1]} images ({grid[0]}x{grid[1]} patches), got {self.num_kept_nodes}"
            )
        for name in ("fc_output_dim", "local_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, got {self.input_norm!r}")
        if self.local_head_init not in LOCAL_HEAD_INITS:
            raise ValueError(
                f"local_head_init must be one of {', '.join(LOCAL_HEAD_INITS)}, got {self.local_head_init!r}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        return patch_grid(self.image_size)

    @property
    def node_dim(self) -> int:
        return NODE_PREFIX_DIM + self.local_dim

    def to_dict(self) -> dict:
        data = asdict(self)
        data["image_size"] = list(self.image_size)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model configuration keys {unknown}; this version knows {sorted(known)}")
        return cls(**data)


class PRGSNetwork(nn.Module):
    """forward(images) -> (global (B, D), local (B, L, 3 + local_dim)); rerank(query, candidates) -> P(same place)."""

    def __init__(self, config: ModelConfig, backbone: nn.Module | None = None):
        """``backbone`` replaces the one ``config`` names (e.g. a custom-size DeiT in tests)."""
        super().__init__()
        self.config = config
        self.backbone = backbone or build_backbone(config.backbone, config.image_size, config.fc_output_dim)
        self.local_head = nn.Linear(self.backbone.token_dim, config.local_dim)
        if config.local_head_init == "xavier":
            nn.init.xavier_uniform_(self.local_head.weight)
        else:
            nn.init.normal_(self.local_head.weight, std=0.01)  # the reference's
        nn.init.zeros_(self.local_head.bias)
        self.reranker = GraphReranker(config.node_dim, config.grid, config.temperature)

    def backbone_outputs(self, images: torch.Tensor, with_local: bool = True):
        """images (B, 3, H, W), ImageNet-normalised -> the backbone's BackboneOutput (after ``config.input_norm``)."""
        if self.config.input_norm == "per_image":
            images = standardize_images(images)
        return self.backbone.forward_prgs(images, with_local=with_local)

    def forward(self, images: torch.Tensor, global_only: bool = False):
        """images (B, 3, H, W) -> global (B, D) if ``global_only`` else (global (B, D), local (B, h*w, 3 + f))."""
        out = self.backbone_outputs(images, with_local=not global_only)
        if global_only:
            return out.global_descriptor
        return out.global_descriptor, self.local_nodes(out.tokens, out.attention, tuple(images.shape[-2:]))

    def local_nodes(self, tokens: torch.Tensor, attention: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Backbone tokens (B, L, C) and attention (B, L) of images of ``image_size`` -> nodes (B, L, 3 + f)."""
        tokens = tokens if self.config.finetune_backbone else tokens.detach()
        grid = (image_size[0] // self.backbone.patch_size, image_size[1] // self.backbone.patch_size)
        return build_nodes(
            self.local_head(tokens), attention, grid, image_size, self.backbone.patch_size, self.config.num_kept_nodes
        )

    def stage0_nodes(
        self, local: torch.Tensor, grid: tuple[int, int] | None = None, kernel: RerankKernel = PLAIN
    ) -> torch.Tensor:
        """local (B, L, C) nodes of B images -> the reranker's stage-0 self-graph output (B, L, C), the input of a
        ``precomputed_stage0`` kernel; computed once per image (feature extraction) instead of once per pair."""
        return self.reranker.stage0_self_graph(local.unsqueeze(1), grid or self.config.grid, kernel.attention)[:, 0]

    def rerank_logits(
        self,
        query_local: torch.Tensor,
        candidates_local: torch.Tensor,
        grid: tuple[int, int] | None = None,
        kernel: RerankKernel = PLAIN,
    ) -> torch.Tensor:
        """query_local (B, L, C), candidates_local (B, K, L, C) -> logits (B, K, 2); stage-0 outputs (stage0_nodes)
        instead of nodes when ``kernel.precomputed_stage0``."""
        if query_local.ndim != 3 or candidates_local.ndim != 4:
            raise ValueError(
                f"expected query_local (B, L, C) and candidates_local (B, K, L, C), got "
                f"{tuple(query_local.shape)} and {tuple(candidates_local.shape)}"
            )
        nodes = torch.cat([query_local.unsqueeze(1), candidates_local], dim=1)  # (B, 1+K, L, C)
        return self.reranker(nodes, grid or self.config.grid, kernel)

    def rerank(
        self,
        query_local: torch.Tensor,
        candidates_local: torch.Tensor,
        grid: tuple[int, int] | None = None,
        kernel: RerankKernel = PLAIN,
    ) -> torch.Tensor:
        """query_local (B, L, C), candidates_local (B, K, L, C) -> P(same place) (B, K); grid defaults to the
        model's (pass (h, w) for inputs of another shape, e.g. portrait)."""
        return match_probability(self.rerank_logits(query_local, candidates_local, grid, kernel))
