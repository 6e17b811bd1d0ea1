"""Backbones: DeiT-distilled (timm) and torchvision ResNets, each giving a global descriptor, the patch tokens and an
attention map over the patches.

Every backbone returns a ``BackboneOutput`` for images (B, 3, H, W) with H and W divisible by 16:
    global_descriptor (B, D)  L2-normalised
    tokens            (B, L, C)  per-patch features (DeiT: tokens entering the last block; ResNet: the stride-16 stage)
    attention         (B, L)     how much the global descriptor looks at each patch (not normalised)
    grid              (h, w)     L = h * w, row-major
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from timm.models.deit import VisionTransformerDistilled
from torch import nn

logger = logging.getLogger(__name__)

PATCH_SIZE = 16


@dataclass(frozen=True)
class DeiTSize:
    embed_dim: int
    depth: int
    num_heads: int
    timm_name: str | None  # timm's ImageNet-pretrained model of this size, if there is one


DEIT_SIZES = {
    "deit_tiny": DeiTSize(192, 12, 3, "deit_tiny_distilled_patch16_224"),
    "deit_small": DeiTSize(384, 12, 6, "deit_small_distilled_patch16_224"),
    "deit_base": DeiTSize(768, 12, 12, "deit_base_distilled_patch16_224"),
    # A 4-block DeiT for the built-in toy world and the tests: trains from scratch on a CPU in minutes.
    "deit_micro": DeiTSize(128, 4, 4, None),
}
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
BACKBONES = tuple(DEIT_SIZES) + RESNETS


@dataclass
class BackboneOutput:
    global_descriptor: torch.Tensor
    tokens: torch.Tensor | None
    attention: torch.Tensor | None
    grid: tuple[int, int]


def patch_grid(image_size: tuple[int, int], patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    """(H, W) -> (H / patch, W / patch); a ValueError naming the size when it is not divisible."""
    height, width = image_size
    if height % patch_size or width % patch_size or height <= 0 or width <= 0:
        raise ValueError(
            f"image size {height}x{width} (HxW) must be positive and divisible by the patch size "
            f"{patch_size}; e.g. 480x640 gives a 30x40 patch grid"
        )
    return height // patch_size, width // patch_size


def fit_pos_embed(patch_pos: torch.Tensor, source_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Positional embeddings (1, gh*gw, C) built for source_grid (gh, gw) -> (1, h*w, C) for grid (h, w).

    Same grid: unchanged. A grid that fits inside: its centre crop (as the reference: 224x224 on a 480x640 model uses
    rows 8-21 and columns 13-26). A larger grid: bicubic enlargement by one factor for both axes (positions keep their
    spacing ratio), then the centre crop. The reference instead resizes to a square and rescales about the centre.
    """
    _, length, channels = patch_pos.shape
    if source_grid[0] * source_grid[1] != length:
        raise ValueError(f"positional embedding of {length} patches does not match grid {source_grid}")
    (gh, gw), (h, w) = source_grid, grid
    if (gh, gw) == (h, w):
        return patch_pos
    maps = patch_pos.reshape(1, gh, gw, channels).permute(0, 3, 1, 2)  # (1, C, gh, gw)
    if h > gh or w > gw:
        scale = max(h / gh, w / gw)
        size = (max(h, round(gh * scale)), max(w, round(gw * scale)))
        maps = F.interpolate(maps, size=size, mode="bicubic", align_corners=False)
        gh, gw = size
    top, left = gh // 2 - h // 2, gw // 2 - w // 2
    maps = maps[:, :, top : top + h, left : left + w]  # (1, C, h, w)
    return maps.permute(0, 2, 3, 1).reshape(1, h * w, channels)


class DeiTBackbone(VisionTransformerDistilled):
    """timm's DeiT-distilled with PRGS's outputs; parameter names are timm's (and the reference's).

    Built for ``image_size`` (its positional embeddings cover that grid); other sizes divisible by 16 also run,
    with the embeddings fitted by ``fit_pos_embed``.
    """

    def __init__(
        self,
        image_size: tuple[int, int] = (480, 640),
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        out_dim: int = 256,
        patch_size: int = PATCH_SIZE,
    ):
        patch_grid(image_size, patch_size)
        super().__init__(
            img_size=tuple(image_size),
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4,
            qkv_bias=True,
            num_classes=out_dim,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.image_size = tuple(image_size)
        self.patch_size = patch_size
        self.token_dim = embed_dim
        self.out_dim = out_dim

    @property
    def built_grid(self) -> tuple[int, int]:
        return patch_grid(self.image_size, self.patch_size)

    def positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, 2 + h*w, C): cls and dist embeddings unchanged, patch embeddings fitted to ``grid``."""
        prefix, patches = self.pos_embed[:, :2], self.pos_embed[:, 2:]
        return torch.cat([prefix, fit_pos_embed(patches, self.built_grid, grid)], dim=1)

    def forward_prgs(self, images: torch.Tensor, with_local: bool = True) -> BackboneOutput:
        grid = patch_grid(tuple(images.shape[-2:]), self.patch_size)
        x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, L, C)
        x = self.patch_embed.norm(x)
        prefix = torch.cat([self.cls_token, self.dist_token], dim=1).expand(x.shape[0], -1, -1)  # (B, 2, C)
        x = self.pos_drop(torch.cat([prefix, x], dim=1) + self.positional_embedding(grid))  # (B, 2+L, C)
        for block in self.blocks[:-1]:
            x = block(x)
        tokens, attention = None, None
        if with_local:
            tokens = x[:, 2:]  # (B, L, C) entering the last block
            x, attention = last_block_with_prefix_attention(self.blocks[-1], x)
        else:
            x = self.blocks[-1](x)
        x = self.norm(x)
        descriptor = (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2  # (B, D)
        return BackboneOutput(F.normalize(descriptor, p=2, dim=1), tokens, attention, grid)


def last_block_with_prefix_attention(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a timm ViT block once and also return how the cls and dist tokens attend to the patches.

    x (B, 2+L, C) -> (block output (B, 2+L, C), attention map (B, L)): the softmax rows of the two prefix tokens,
    summed over heads and both tokens. Only those 2 rows of the attention matrix are materialised; the block's own
    attention runs fused, once.
    """
    attn = block.attn
    batch, length, channels = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(batch, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, 2+L, head_dim)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mixed = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 2+L, head_dim)
    mixed = mixed.transpose(1, 2).reshape(batch, length, -1)  # (B, 2+L, C)
    mixed = attn.proj_drop(attn.proj(getattr(attn, "norm", nn.Identity())(mixed)))
    x = x + block.drop_path1(block.ls1(mixed))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    prefix_rows = ((q[:, :, :2] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, 2, 2+L)
    return x, prefix_rows[..., 2:].sum(dim=(1, 2))  # (B, L)


class GeM(nn.Module):
    """Generalised-mean pooling with a learnable exponent: (B, C, h, w) -> (B, C)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p).flatten(1)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet for PRGS: stride-16 stage (layer3) -> local tokens; layer4 -> GeM -> linear -> global.

    attention = sum over descriptor dimensions of clamp(<L2-normalised layer4 feature, fc row>, 1e-6), upsampled
    (bicubic) from the stride-32 grid to the stride-16 grid. Channel counts are read from the network, so every
    torchvision ResNet depth works.
    """

    def __init__(self, arch: str = "resnet50", image_size: tuple[int, int] = (480, 640), out_dim: int = 256):
        super().__init__()
        if arch not in RESNETS:
            raise ValueError(f"unknown ResNet {arch!r}; choose one of {', '.join(RESNETS)}")
        patch_grid(image_size)
        net = getattr(torchvision.models, arch)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        with torch.no_grad():
            x3 = self._stride16(torch.zeros(1, 3, 64, 64))
            channels3, channels4 = x3.shape[1], self.layer4(x3).shape[1]
        self.image_size = tuple(image_size)
        self.patch_size = PATCH_SIZE
        self.token_dim = channels3
        self.out_dim = out_dim
        self.gem = GeM()
        self.fc = nn.Linear(channels4, out_dim)

    def _stride16(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_prgs(self, images: torch.Tensor, with_local: bool = True) -> BackboneOutput:
        grid = patch_grid(tuple(images.shape[-2:]))
        x3 = self._stride16(images)  # (B, C3, h, w)
        x4 = F.normalize(self.layer4(x3), p=2, dim=1)  # (B, C4, h/2, w/2)
        descriptor = F.normalize(self.fc(self.gem(x4)), p=2, dim=1)  # (B, D)
        if not with_local:
            return BackboneOutput(descriptor, None, None, grid)
        similarity = x4.clamp(min=1e-6).flatten(2).transpose(1, 2) @ self.fc.weight.t()  # (B, h4*w4, D)
        coarse = similarity.clamp(min=1e-6).sum(-1).reshape(x4.shape[0], 1, *x4.shape[-2:])  # (B, 1, h4, w4)
        attention = F.interpolate(coarse, size=grid, mode="bicubic", align_corners=False).flatten(1)  # (B, L)
        return BackboneOutput(descriptor, x3.flatten(2).transpose(1, 2), attention, grid)


def build_backbone(name: str, image_size: tuple[int, int], out_dim: int) -> nn.Module:
    """A backbone by name (see BACKBONES), built for ``image_size`` (H, W) with an ``out_dim`` global descriptor."""
    if name in DEIT_SIZES:
        size = DEIT_SIZES[name]
        return DeiTBackbone(image_size, size.embed_dim, size.depth, size.num_heads, out_dim)
    if name in RESNETS:
        return ResNetBackbone(name, image_size, out_dim)
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
