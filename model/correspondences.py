"""What the cross graphs matched: the soft adjacency of every cross graph layer of the reranker, captured with forward
hooks while the reranker runs unchanged, and where each stage's nodes lie in the image.

In stage l, the cross graph re-expresses node i of candidate k as a weighted sum of candidate k's nodes, with weights
A_k[i, j] = softmax_j(-||q_i - h_kj|| / temperature + lamda [i == j]) from the distance between the *query's* node i
and candidate k's node j (see GraphLayer). Row i of A_k is therefore a soft correspondence from query node i to the
nodes of candidate k: the patch-to-region matches the pictures of docs/outputs.md draw.
"""

from __future__ import annotations

import torch

from model.reranker import GraphLayer, GraphReranker, stage_grids


def graph_attention(layer: GraphLayer, x: torch.Tensor) -> torch.Tensor:
    """The soft adjacency ``layer`` computes on its input x (B, N, L, C): (B, N, L, L) for a self or cross layer, rows
    summing to 1. Recomputed from the layer's own parameters with the operations of GraphLayer.forward;
    tests/test_api.py checks that it reproduces the layer's output."""
    h = layer.linear(x)  # (B, N, L, C)
    q = h[:, :1] if layer.mode == "cross" else h
    eye = torch.eye(h.shape[-2], device=h.device, dtype=h.dtype)
    return (-torch.cdist(q, h, p=2) / layer.temperature + layer.lamda * eye).softmax(dim=-1)  # (B, N, L, L)


def cross_graph_attention(
    reranker: GraphReranker, nodes: torch.Tensor, grid: tuple[int, int], stages: tuple[int, ...] = (0, 1, 2)
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run the reranker on nodes (B, 1+K, L, C), query first, and capture its cross graphs' adjacency.

    Returns (logits (B, K, 2), exactly what reranker(nodes, grid) returns; {stage: A (B, K, L_s, L_s)} for the
    requested stages, the query's own row dropped). A[b, k, i, j]: weight of candidate k's node j for query node i.
    """
    captured: dict[int, torch.Tensor] = {}

    def capture(stage: int):
        def hook(layer: GraphLayer, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            captured[stage] = graph_attention(layer, inputs[0])[:, 1:]  # (B, K, L_s, L_s)

        return hook

    handles = [
        layer.register_forward_hook(capture(stage))
        for stage, layer in enumerate(reranker.crossnode_graph_layers)
        if stage in stages
    ]
    try:
        logits = reranker(nodes, grid)
    finally:
        for handle in handles:
            handle.remove()
    return logits, captured


def stage_node_boxes(grid: tuple[int, int], patch_size: int) -> list[torch.Tensor]:
    """Pixel boxes (x0, y0, x1, y1) of the nodes of every stage for a patch grid (h, w), one (L_s, 4) float tensor per
    stage in node order: the patches (stage 0), the 3x3 stride-2 regions (stage 1), then those regions again plus
    their 2x2 and 4x4 groups (stage 2). A region's box is the union of the patches it pools, clipped to the image."""
    grids = stage_grids(grid)
    patches = _boxes(grids["patch"], kernel=1, stride=1, padding=0)  # in patch units
    regions = _boxes(grids["region"], kernel=3, stride=2, padding=1)
    region_rows, region_columns = grids["region"]
    groups = []
    for size, key in ((2, "region_2x2"), (4, "region_4x4")):
        cells = _boxes(grids[key], kernel=size, stride=size, padding=0)  # in region units
        first = regions.reshape(region_rows, region_columns, 4)
        top_left = first[cells[:, 1].long(), cells[:, 0].long()]  # (L', 4) of the first region of each group
        bottom_right = first[cells[:, 3].long() - 1, cells[:, 2].long() - 1]
        groups.append(torch.cat([top_left[:, :2], bottom_right[:, 2:]], dim=1))
    height, width = grid
    limits = torch.tensor([width, height, width, height], dtype=torch.float32)
    boxes = [patches, regions, torch.cat([regions, *groups])]
    return [torch.minimum(box.clamp(min=0), limits) * patch_size for box in boxes]


def _boxes(grid: tuple[int, int], kernel: int, stride: int, padding: int) -> torch.Tensor:
    """(rows*columns, 4) boxes (x0, y0, x1, y1), row-major, of a convolution's windows in input cells (unclipped)."""
    rows, columns = grid
    y0 = torch.arange(rows, dtype=torch.float32) * stride - padding
    x0 = torch.arange(columns, dtype=torch.float32) * stride - padding
    y0, x0 = torch.meshgrid(y0, x0, indexing="ij")  # (rows, columns) each
    return torch.stack([x0, y0, x0 + kernel, y0 + kernel], dim=-1).reshape(-1, 4)
