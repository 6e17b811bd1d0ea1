"""The node graphs' L2-distance attention ``softmax(-||q_i - h_j|| / T + lamda [i == j]) @ h`` with bfloat16
matrix products accumulated in float32: the fast path for CPUs that multiply bfloat16 in hardware (AMX, AVX-512
BF16), beside GraphLayer's plain torch.cdist path.

Why not simply ``torch.cdist`` on bfloat16: the distances between identical rows (a node and itself, the zeroed
nodes of an image, which are one point) are the square roots of the rounding error of ``|q|^2 + |h|^2 - 2 q.h``.
Rounded to bfloat16 (8 bits), that error is ~0.4% of ``|q|^2``, so identical rows land about 6% of their norm
apart instead of ~0 (float32: ~0.03%), which moves the logits by tenths. Here, as in the fused CUDA kernel
(model/l2_attention.py):

- q and h are rounded to bfloat16 once, and the squared norms are taken of the rounded rows in float32, so the
  distance is that between the rounded vectors;
- the whole squared distance comes out of ONE matrix product of augmented rows,
  ``[q, |q|^2_hi, |q|^2_mid, |q|^2_lo, 1, 1, 1] . [-2h, 1, 1, 1, |h|^2_hi, |h|^2_mid, |h|^2_lo]``, where the three
  bfloat16 parts of a float32 norm add up to it (8 + 8 + 8 mantissa bits). The product accumulates in float32, so the
  cancellation happens in float32 as in the plain path; only the result is rounded to bfloat16, relative to the
  distance itself (0.2%), and identical rows stay at ~0;
- the softmax runs in float32; its weights and h enter the aggregation as bfloat16, accumulated in float32.

Inference only (used under torch.inference_mode / no_grad): no autograd graph is kept for the rounded operands.
"""

from __future__ import annotations

import torch

# rows of graph images per block: the (rows, L, L) temporaries of a block stay in the CPU's cache-sized range
# instead of one (N, L, L) pass per operation over hundreds of MB
IMAGES_PER_BLOCK = 8


def split_bf16(x: torch.Tensor, parts: int = 3) -> torch.Tensor:
    """float32 x (...) -> (..., parts) bfloat16 terms whose float32 sum is x to ~24 bits (hi, mid, lo).

    The terms come from float32 -> bfloat16 -> float32 round trips. Under torch.compile they hold only with
    ``torch._inductor.config.emulate_precision_casts = True``; by default TorchInductor drops the round trips."""
    terms = []
    rest = x.float()
    for _ in range(parts):
        term = rest.bfloat16()
        terms.append(term)
        rest = rest - term.float()
    return torch.stack(terms, dim=-1)


def augmented_rows(q: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, 1 or N, L, C), h (B, N, L, C) -> (q_aug (B, 1 or N, L, C+6), h_aug (B, N, L, C+6), h rounded (B, N, L, C))
    in bfloat16, with q_aug @ h_aug^T = |q|^2 + |h|^2 - 2 q.h over the rounded rows."""
    q_round, h_round = q.bfloat16(), h.bfloat16()
    q_norm = split_bf16(q_round.float().square().sum(-1))  # (B, 1|N, L, 3)
    h_norm = split_bf16(h_round.float().square().sum(-1))  # (B, N, L, 3)
    q_aug = torch.cat([q_round, q_norm, torch.ones_like(q_norm)], dim=-1)
    h_aug = torch.cat([-2 * h_round, torch.ones_like(h_norm), h_norm], dim=-1)  # -2h: exact in bfloat16
    return q_aug, h_aug, h_round


def squared_distances_bf16(q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """q (B, 1 or N, L, C), h (B, N, L, C) -> squared L2 distances (B, N, L, L) in bfloat16 (see the module)."""
    q_aug, h_aug, _ = augmented_rows(q, h)
    return q_aug @ h_aug.transpose(-1, -2)


def bf16_graph_attention(q: torch.Tensor, h: torch.Tensor, temperature: float, lamda: torch.Tensor) -> torch.Tensor:
    """q (B, 1 or N, L, C) queries (1: read from the group's first image, as the cross graphs do), h (B, N, L, C)
    keys and values -> softmax(-cdist(q, h) / temperature + lamda * I) @ h, (B, N, L, C) float32; computed in blocks
    of IMAGES_PER_BLOCK images of the group."""
    q_aug, h_aug, h_round = augmented_rows(q, h)
    group = h.shape[1]
    out = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    for start in range(0, group, IMAGES_PER_BLOCK):
        block = slice(start, start + IMAGES_PER_BLOCK)
        q_block = q_aug if q_aug.shape[1] == 1 else q_aug[:, block]
        squared = q_block @ h_aug[:, block].transpose(-1, -2)  # (B, n, L, L) bfloat16, accumulated in float32
        logits = squared.float().clamp_(min=0).sqrt_().mul_(-1.0 / temperature)
        logits.diagonal(dim1=-2, dim2=-1).add_(lamda.to(logits.dtype))
        weights = logits.softmax(dim=-1).bfloat16()  # (B, n, L, L)
        out[:, block] = weights @ h_round[:, block]  # bfloat16 operands, float32 accumulation
    return out
