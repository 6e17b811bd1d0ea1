"""The PRGS reranker: Patch-to-Region projections, self/cross node graphs and the image-level graph search.

Input: the local features of a query and its K candidates, ``nodes`` of shape (B, 1+K, L, C) with the query first,
L = h*w patch nodes in row-major grid order and C = 3 + local_dim channels ``[x, y, attention, f]``.
Output: logits (B, K, 2); ``softmax(logits)[..., 1]`` is P(same place) for each candidate.

Per stage l = 0, 1, 2 (the paper's pyramid; 30x40 patches -> 1200 -> 300 -> 300+70+15 = 385 region nodes):
    X <- PatchToRegion_l(X)    (identity / 3x3 stride-2 / three scales)
    X <- self graph_l(X)       (graph over the nodes of each image)
    X <- cross graph_l(X)      (every image re-expressed on the query's nodes)
then a per-node MLP gives one R-d vector per image (R = region count), a graph over the 1+K images of a group
("graph search") mixes them, and a linear classifier scores each candidate.

Attribute names (``fine2cor``, ``selfnode_graph_layers``, ...) follow the reference's state-dict keys so its
checkpoints load unchanged; ``fine2cor`` holds the Patch-to-Region projections.

Stage 0's Patch-to-Region step (identity + peg) and self graph see one image at a time and no query, so
``stage0_self_graph`` can run once per image when features are extracted; ``forward`` then starts from its output
(``RerankKernel.precomputed_stage0``). The kernels (``RERANK_KERNELS``) compute the same function with different
rounding; docs/reranker_speed.md says what each trades.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.bf16_attention import IMAGES_PER_BLOCK, bf16_graph_attention
from model.l2_attention import PRECISIONS as FUSED_PRECISIONS
from model.l2_attention import l2_graph_attention

NUM_STAGES = 3  # identity, single-scale and multi-scale Patch-to-Region stages, as in the paper
MIN_GRID_SIDE = 7  # smallest patch grid side whose 15x20-style stage-1 grid still fits the 4x4 region kernel


@dataclass(frozen=True)
class RerankKernel:
    """How the reranker computes its (unchanged) function.

    precomputed_stage0: the input is the output of ``stage0_self_graph`` (computed once per image) instead of the
        raw nodes; the same mathematics.
    attention: "cdist" (the reference's torch.cdist + softmax + matmul, float32), "bf16_matmul" (the distances and
        the aggregation as bfloat16 matrix products accumulated in float32, model/bf16_attention.py: for CPUs with
        native bfloat16) or a fused Triton kernel on CUDA (model/l2_attention.py) whose dot products use "tf32" or
        "bf16" tensor cores ("ieee": float32 products).
    channels_last: Patch-to-Region pooling over channels-last maps with one fused F.layer_norm, instead of the
        reference's LayerNorm2d op sequence (which keeps float32 rounding identical to the reference).
    """

    name: str
    precomputed_stage0: bool
    attention: str
    channels_last: bool

    @property
    def fused(self) -> bool:
        """A fused Triton kernel (CUDA): it fixes its own precision."""
        return self.attention in FUSED_PRECISIONS


RERANK_KERNELS = {
    kernel.name: kernel
    for kernel in (
        RerankKernel("plain", False, "cdist", False),  # today's path: reproduces the reference (golden tests)
        RerankKernel("stage0", True, "cdist", False),  # the stage-0 self graph precomputed per image; CPU or CUDA
        RerankKernel("stage0_bf16", True, "bf16_matmul", False),  # + bfloat16 distance and aggregation products
        RerankKernel("fused_tf32", True, "tf32", True),  # + fused L2 attention on TF32 tensor cores (CUDA)
        RerankKernel("fused_bf16", True, "bf16", True),  # + fused L2 attention on bf16 tensor cores (CUDA)
    )
}
PLAIN = RERANK_KERNELS["plain"]


def rerank_kernel(name: str) -> RerankKernel:
    """The kernel called ``name``; ValueError naming the choices otherwise."""
    if name not in RERANK_KERNELS:
        raise ValueError(f"unknown reranker kernel {name!r}; choose one of {', '.join(RERANK_KERNELS)}")
    return RERANK_KERNELS[name]


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def stage_grids(grid: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Grid sizes of every Patch-to-Region stage for a patch grid (h, w).

    Returns {"patch": (h, w), "region": (h1, w1), "region_2x2": (h2, w2), "region_4x4": (h4, w4)}:
    stage 0 keeps the patch grid, stage 1 pools it with a 3x3 stride-2 kernel, stage 2 adds 2x2 and 4x4 regions.
    """
    h, w = grid
    if h < MIN_GRID_SIDE or w < MIN_GRID_SIDE:
        raise ValueError(
            f"patch grid {h}x{w} is too small for the reranker: the multi-scale Patch-to-Region stage needs at least "
            f"{MIN_GRID_SIDE}x{MIN_GRID_SIDE} patches ({MIN_GRID_SIDE * 16}x{MIN_GRID_SIDE * 16} pixels at patch 16)"
        )
    h1, w1 = _conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1)
    return {
        "patch": (h, w),
        "region": (h1, w1),
        "region_2x2": (_conv_out(h1, 2, 2, 0), _conv_out(w1, 2, 2, 0)),
        "region_4x4": (_conv_out(h1, 4, 4, 0), _conv_out(w1, 4, 4, 0)),
    }


def num_regions(grid: tuple[int, int]) -> int:
    """Region nodes after the last stage: h1*w1 + h2*w2 + h4*w4 (385 for the 30x40 grid of a 480x640 image)."""
    grids = stage_grids(grid)
    return sum(a * b for key, (a, b) in grids.items() if key != "patch")


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of every location of a (B, C, H, W) map (biased variance, as the reference)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # this exact op sequence keeps float32 rounding identical to the reference (the graphs amplify it)
        std = torch.sqrt(x.var(1, unbiased=False, keepdim=True) + self.eps)
        return (x - x.mean(1, keepdim=True)) / std * self.weight + self.bias


def _region_pool(channels: int, kernel: int, stride: int, padding: int) -> nn.Sequential:
    """Depth-wise convolution -> LayerNorm2d -> GELU: pools patches (or regions) into larger regions."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel, stride=stride, padding=padding, groups=channels),
        LayerNorm2d(channels),
        nn.GELU(),
    )


class PatchToRegion(nn.Module):
    """One Patch-to-Region stage: pools the nodes of every image on its grid into region nodes.

    mode "identity": keep the grid; "single": 3x3 stride-2 regions; "multi": the grid itself plus 2x2 and 4x4
    regions, concatenated along the node axis. ``peg`` (a per-channel scale, shared by the branches of "multi") adds
    x + peg(x) to every branch.
    """

    def __init__(self, channels: int, mode: str):
        super().__init__()
        if mode not in ("identity", "single", "multi"):
            raise ValueError(f"PatchToRegion mode must be 'identity', 'single' or 'multi', got {mode!r}")
        self.mode = mode
        self.peg = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        if mode == "single":
            self.proj = _region_pool(channels, 3, 2, 1)
        elif mode == "multi":
            self.proj1 = _region_pool(channels, 2, 2, 0)
            self.proj2 = _region_pool(channels, 4, 4, 0)

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int], channels_last: bool = False
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """x (B, N, L, C) on grid (h, w) -> (region nodes (B, N, L', C), grid of the first scale).

        Scales are concatenated along the node axis, each flattened row-major. The views below keep the memory
        layout of the reference, so the graph layers' matrix products round alike and the golden outputs match
        (the distance graphs amplify float32 rounding differences to ~1e-4). ``channels_last``: the same function
        over channels-last maps (no transposes, one F.layer_norm per pooling), rounded differently.
        """
        if channels_last:
            return self._forward_channels_last(x, grid)
        batch, group, _, channels = x.shape
        maps = x.transpose(-1, -2).reshape(batch * group, channels, *grid)  # (B*N, C, h, w)
        if self.mode == "single":
            maps = self.proj(maps)
        scales = [maps]
        if self.mode == "multi":
            scales += [self.proj1(maps), self.proj2(maps)]
        scales = [s + self.peg(s) for s in scales]  # (B*N, C, h_s, w_s) each
        nodes = torch.cat([s.flatten(2) for s in scales], dim=-1) if len(scales) > 1 else scales[0].flatten(2)
        # (B*N, C, L') -> (B, N, C, L') -> (B, N, L', C)
        return nodes.reshape(batch, group, channels, -1).transpose(-1, -2), tuple(scales[0].shape[-2:])

    def _forward_channels_last(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        batch, group, _, channels = x.shape
        # (B, N, L, C) -> (B*N, h, w, C) -> a (B*N, C, h, w) view over channels-last memory: no copy
        maps = x.reshape(batch * group, *grid, channels).permute(0, 3, 1, 2)
        if self.mode == "single":
            maps = _pool_channels_last(self.proj, maps)
        scales = [maps]
        if self.mode == "multi":
            scales += [_pool_channels_last(self.proj1, maps), _pool_channels_last(self.proj2, maps)]
        peg = self.peg.weight.reshape(1, channels, 1, 1)  # the depth-wise 1x1 convolution is a per-channel scale
        scales = [s + s * peg for s in scales]
        # (B*N, C, h_s, w_s) -> (B*N, h_s*w_s, C), concatenated over the scales -> (B, N, L', C)
        nodes = torch.cat([s.permute(0, 2, 3, 1).reshape(batch * group, -1, channels) for s in scales], dim=1)
        return nodes.reshape(batch, group, -1, channels), tuple(scales[0].shape[-2:])


def _pool_channels_last(pool: nn.Sequential, maps: torch.Tensor) -> torch.Tensor:
    """_region_pool's depth-wise conv -> LayerNorm2d -> GELU on (B, C, h, w) maps, the norm as one F.layer_norm over
    the channels of a channels-last view."""
    conv, norm, _ = pool
    pooled = conv(maps).permute(0, 2, 3, 1)  # (B, h', w', C)
    channels = pooled.shape[-1]
    pooled = F.layer_norm(pooled, (channels,), norm.weight.reshape(channels), norm.bias.reshape(channels), norm.eps)
    return F.gelu(pooled).permute(0, 3, 1, 2)  # (B, C, h', w')


class GraphLayer(nn.Module):
    """Attention graph layer: soft adjacency from L2 distances, neighbour aggregation, gated residual.

    mode "self":  x (B, N, L, C), a graph over the L nodes of each image;
    mode "cross": x (B, N, L, C), node i of image n aggregates image n's nodes with weights from the distance to
                  the *query's* node i (image 0), so every candidate is re-expressed on the query's node layout;
    mode "image": x (B, N, D), a graph over the N images of a group.
    A = softmax(-||q_i - h_j|| / temperature + lamda * [i == j]);  out = (1 - a) x + a GELU(LN(A h)),
    with h = linear(x) and a = clamp(alpha, 0.1, 0.9).
    """

    def __init__(self, dim: int, mode: str, temperature: float = 0.5):
        super().__init__()
        if mode not in ("self", "cross", "image"):
            raise ValueError(f"GraphLayer mode must be 'self', 'cross' or 'image', got {mode!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.mode = mode
        self.temperature = temperature
        self.linear = nn.Linear(dim, dim)
        self.norm_layer = nn.LayerNorm(dim, eps=1e-6)
        self.alpha = nn.Parameter(torch.tensor([0.5]))
        self.lamda = nn.Parameter(torch.tensor([0.1]))

    def forward(self, x: torch.Tensor, attention: str = "cdist") -> torch.Tensor:
        """x (B, N, L, C) or (B, N, D) -> the same shape. ``attention``: "cdist" (the reference's) or a fused
        kernel's precision (RerankKernel.attention; node graphs only, inference only)."""
        h = self.linear(x)  # (B, N, L, C) or (B, N, D)
        q = h[:, :1] if self.mode == "cross" else h  # cross: the query image's nodes, broadcast over N
        if attention == "cdist" or self.mode == "image":
            aggregated = self._cdist_attention(q, h)
        elif torch.is_grad_enabled():
            raise ValueError("the fast reranker kernels are for inference only (no backward); train with 'plain'")
        elif attention == "bf16_matmul":
            aggregated = bf16_graph_attention(q, h, self.temperature, self.lamda)
        else:
            aggregated = l2_graph_attention(q, h, self.temperature, self.lamda, attention)
        y = F.gelu(self.norm_layer(aggregated))
        alpha = self.alpha.clamp(0.1, 0.9)
        return (1 - alpha) * x + alpha * y

    def _cdist_attention(self, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """softmax(-cdist(q, h) / temperature + lamda I) @ h, as the reference computes it.

        Under inference on the CPU the node graphs run IMAGES_PER_BLOCK images of the group at a time: the same
        operations on each block, so the (B, N, L, L) distance and weight matrices (582 MB each at 101 images x 1200
        nodes in float32) never exist whole; a block's matrices stay near the cache. Batched matrix products need not
        be bit-identical across batch sizes, so blocked values may differ from the whole group's by rounding
        (measured: none in float32, 2e-15 in float64 on an AMD EPYC). CUDA keeps the whole group (its measured
        path: one launch per product instead of one per block)."""
        if torch.is_grad_enabled():
            # torch.cdist's default mode, exactly as the reference (other formulas differ by up to ~3e-4)
            distances = torch.cdist(q, h, p=2)  # (B, N, L, L) or (B, N, N)
            eye = torch.eye(h.shape[-2], device=h.device, dtype=h.dtype)
            return (-distances / self.temperature + self.lamda * eye).softmax(dim=-1) @ h
        # whole: an image graph (B, N, D), a group of one block, or CUDA
        if h.ndim == 3 or h.shape[1] <= IMAGES_PER_BLOCK or h.device.type != "cpu":
            return self._attention_in_place(q, h)
        out = torch.empty_like(h)  # (B, N, L, C)
        for start in range(0, h.shape[1], IMAGES_PER_BLOCK):
            block = slice(start, start + IMAGES_PER_BLOCK)
            out[:, block] = self._attention_in_place(q if q.shape[1] == 1 else q[:, block], h[:, block])
        return out

    def _attention_in_place(self, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The inference form: the same values as the autograd form (bit for bit) without two more (.., L, L)
        temporaries; q (B, 1 or n, L, C), h (B, n, L, C) -> (B, n, L, C), or (B, N, D) image graphs."""
        logits = torch.cdist(q, h, p=2).div_(-self.temperature)  # (B, n, L, L) or (B, N, N)
        logits.diagonal(dim1=-2, dim2=-1).add_(self.lamda)
        return logits.softmax(dim=-1) @ h


class GraphReranker(nn.Module):
    """PRGS reranker for a fixed region count (set by the patch grid it is built for).

    The image-graph and classifier widths equal the region count, so trained weights are tied to it: a reranker
    built for 30x40 (385 regions) also accepts a 40x30 portrait grid (also 385), and refuses grids with another count.
    """

    def __init__(
        self, node_dim: int = 131, grid: tuple[int, int] = (30, 40), temperature: float = 0.5, num_classes: int = 2
    ):
        super().__init__()
        self.node_dim = node_dim
        self.grid = tuple(grid)
        self.num_regions = num_regions(self.grid)
        self.fine2cor = nn.ModuleList(PatchToRegion(node_dim, mode) for mode in ("identity", "single", "multi"))
        self.selfnode_graph_layers = nn.ModuleList(GraphLayer(node_dim, "self", temperature) for _ in range(NUM_STAGES))
        self.crossnode_graph_layers = nn.ModuleList(
            GraphLayer(node_dim, "cross", temperature) for _ in range(NUM_STAGES)
        )
        self.dim_reduce = nn.Sequential(  # per-node MLP 131 -> 64 -> 32 -> 16 -> 1, one scalar per region node
            nn.Linear(node_dim, 64),
            nn.LayerNorm(64),
            nn.GELU(),
            nn.Linear(64, 32),
            nn.LayerNorm(32),
            nn.GELU(),
            nn.Linear(32, 16),
            nn.LayerNorm(16),
            nn.GELU(),
            nn.Linear(16, 1),
            nn.GELU(),
        )
        self.image_graph_layers = nn.ModuleList(
            GraphLayer(self.num_regions, "image", temperature) for _ in range(NUM_STAGES)
        )
        self.classifier = nn.Linear(self.num_regions, num_classes)
        self._init_params()

    def _init_params(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def check_input(self, nodes: torch.Tensor, grid: tuple[int, int]) -> None:
        """Raise a ValueError that names the mismatch when ``nodes`` cannot be reranked on ``grid``."""
        if nodes.ndim != 4:
            raise ValueError(f"reranker input must be (B, 1+K, L, C), got shape {tuple(nodes.shape)}")
        batch, group, length, channels = nodes.shape
        h, w = grid
        if channels != self.node_dim:
            raise ValueError(
                f"reranker nodes have {channels} channels, expected {self.node_dim} "
                f"([x, y, attention] + {self.node_dim - 3}-d local features)"
            )
        if group < 2:
            raise ValueError(f"reranker needs the query and at least one candidate, got {group} image(s) per group")
        if length != h * w:
            raise ValueError(
                f"reranker got {length} nodes per image but the grid {h}x{w} has {h * w}; "
                f"local features must keep every patch node in grid order"
            )
        regions = num_regions((h, w))
        if regions != self.num_regions:
            raise ValueError(
                f"grid {h}x{w} gives {regions} region nodes, but this reranker was built for grid "
                f"{self.grid[0]}x{self.grid[1]} ({self.num_regions} regions): its image-graph and classifier weights "
                f"are tied to the region count. Evaluate at the resolution the model was trained for."
            )

    def stage0_self_graph(self, nodes: torch.Tensor, grid: tuple[int, int], attention: str = "cdist") -> torch.Tensor:
        """nodes (B, N, L, C) -> stage 0's Patch-to-Region step (identity + peg) and self graph, (B, N, L, C).

        Each image's output depends on that image alone. Its zeroed (masked) rows come out equal (up to rounding):
        they are the same point, so one row stands for all of them (feature_store keeps one)."""
        x, _ = self.fine2cor[0](nodes, grid)
        return self.selfnode_graph_layers[0](x, attention)

    def forward(self, nodes: torch.Tensor, grid: tuple[int, int], kernel: RerankKernel = PLAIN) -> torch.Tensor:
        """nodes (B, 1+K, L, C), query first, L = h*w in grid order -> logits (B, K, 2). With
        ``kernel.precomputed_stage0`` the rows are ``stage0_self_graph``'s output instead of the raw nodes."""
        self.check_input(nodes, grid)
        x = nodes if kernel.precomputed_stage0 else self.stage0_self_graph(nodes, grid)
        x = self.crossnode_graph_layers[0](x, kernel.attention)
        for project, self_graph, cross_graph in zip(
            self.fine2cor[1:], self.selfnode_graph_layers[1:], self.crossnode_graph_layers[1:]
        ):
            x, grid = project(x, grid, kernel.channels_last)  # (B, N, L', C); the next stage pools the finest grid
            x = cross_graph(self_graph(x, kernel.attention), kernel.attention)
        region_scores = self.dim_reduce(x).squeeze(-1)  # (B, N, R)
        for image_graph in self.image_graph_layers:
            region_scores = image_graph(region_scores)  # (B, N, R)
        return self.classifier(region_scores)[:, 1:]  # (B, K, 2): the query row is dropped


def match_probability(logits: torch.Tensor) -> torch.Tensor:
    """logits (..., 2) -> P(same place) (...)."""
    return logits.float().softmax(dim=-1)[..., 1]
