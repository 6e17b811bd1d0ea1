"""Local features: one node ``[x, y, attention, f]`` per patch, in grid order, the least attended nodes zeroed."""

from __future__ import annotations

import torch

NODE_PREFIX_DIM = 3  # x, y, attention before the local descriptor f


def default_num_kept_nodes(num_nodes: int) -> int:
    """The reference keeps 1000 of 1200 nodes at 480x640; the same 5/6 share at other grids."""
    return num_nodes * 5 // 6


def node_coordinates(
    grid: tuple[int, int], patch_size: int, image_size: tuple[int, int], device: torch.device | None = None
) -> torch.Tensor:
    """Patch centres divided by the longer image side, row-major: (h*w, 2) as [x, y].

    At 480x640 and patch 16: x = ((p mod 40) * 16 + 8) / 640 and y = ((p div 40) * 16 + 8) / 640.
    """
    h, w = grid
    index = torch.arange(h * w, device=device)
    longer_side = float(max(image_size))
    x = ((index % w) * patch_size + patch_size / 2) / longer_side
    y = ((index // w) * patch_size + patch_size / 2) / longer_side
    return torch.stack([x, y], dim=1).float()


def kept_node_mask(attention: torch.Tensor, num_kept: int) -> torch.Tensor:
    """attention (B, L) -> bool (B, L), True for the ``num_kept`` most attended nodes of each image."""
    num_nodes = attention.shape[1]
    if not 0 < num_kept <= num_nodes:
        raise ValueError(f"num_kept_nodes must be in [1, {num_nodes}] for a grid of {num_nodes} nodes, got {num_kept}")
    kept = torch.zeros_like(attention, dtype=torch.bool)
    top = attention.topk(num_kept, dim=1).indices  # (B, num_kept)
    return kept.scatter_(1, top, True)


def build_nodes(
    descriptors: torch.Tensor,
    attention: torch.Tensor,
    grid: tuple[int, int],
    image_size: tuple[int, int],
    patch_size: int,
    num_kept: int,
) -> torch.Tensor:
    """Reranker nodes from per-patch descriptors and the raw attention map.

    descriptors (B, L, D) and attention (B, L), both in row-major grid order ->
    nodes (B, L, 3 + D) float32 = [x, y, attention / max attention, f], with the L - num_kept least attended rows
    set to zero in every channel (coordinates included). Rows stay in grid order.
    """
    batch, num_nodes, _ = descriptors.shape
    if num_nodes != grid[0] * grid[1] or attention.shape != (batch, num_nodes):
        raise ValueError(
            f"descriptors {tuple(descriptors.shape)} and attention {tuple(attention.shape)} do not fit "
            f"the {grid[0]}x{grid[1]} grid"
        )
    attention = attention.float()
    attention = attention / attention.amax(dim=1, keepdim=True)  # (B, L) in (0, 1]
    xy = node_coordinates(grid, patch_size, image_size, attention.device).expand(batch, -1, -1)  # (B, L, 2)
    nodes = torch.cat([xy, attention.unsqueeze(-1), descriptors.float()], dim=-1)  # (B, L, 3 + D)
    return torch.where(kept_node_mask(attention, num_kept).unsqueeze(-1), nodes, 0.0)
