"""Pictures: a query beside its top predictions (correct framed green, wrong red, unknown light grey), what the
reranker's cross graphs matched between a query and its candidates, and training curves; all written atomically."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from places.images import open_rgb_image
from util import atomic_write

THUMBNAIL_HEIGHT = 160
BORDER = 5
GAP = 6
LABEL_HEIGHT = 16
GREEN, RED, GREY, LIGHT_GREY = (40, 170, 60), (210, 40, 40), (120, 120, 120), (200, 200, 200)


def frame_colour(correct: bool | None) -> tuple[int, int, int]:
    """Green for a correct prediction, red for a wrong one, light grey when unknown (no ground truth)."""
    return LIGHT_GREY if correct is None else GREEN if correct else RED


def _thumbnail(path: str | Path, frame: tuple[int, int, int]) -> Image.Image:
    image = open_rgb_image(path)
    width = max(1, round(image.width * THUMBNAIL_HEIGHT / image.height))
    return ImageOps.expand(image.resize((width, THUMBNAIL_HEIGHT), Image.BILINEAR), border=BORDER, fill=frame)


def save_prediction_picture(
    path: str | Path,
    query_path: str | Path,
    rows: Sequence[tuple[str, Sequence[str | Path], Sequence[bool | None]]],
) -> None:
    """One PNG: the query (grey frame) at the left of each row, then that row's predictions in rank order.

    rows: (label, prediction paths, is_correct per prediction: True, False or None when unknown), e.g.
    ("global", ...), ("reranked", ...).
    """
    query = _thumbnail(query_path, GREY)
    rendered = []
    for label, paths, correct in rows:
        tiles = [query] + [_thumbnail(p, frame_colour(ok)) for p, ok in zip(paths, correct)]
        rendered.append((label, tiles))
    width = max(sum(t.width for t in tiles) + GAP * (len(tiles) - 1) for _, tiles in rendered)
    tile_height = THUMBNAIL_HEIGHT + 2 * BORDER
    canvas = Image.new("RGB", (width, len(rendered) * (tile_height + LABEL_HEIGHT + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for label, tiles in rendered:
        draw.text((2, y + 2), f"query | {label} top-{len(tiles) - 1}", fill=(0, 0, 0))
        x = 0
        for tile in tiles:
            canvas.paste(tile, (x, y + LABEL_HEIGHT))
            x += tile.width + GAP
        y += tile_height + LABEL_HEIGHT + GAP
    atomic_write(path, lambda file: canvas.save(file, format="PNG"))


@dataclass
class RerankedCandidate:
    """One candidate of a reranking picture."""

    image: Image.Image  # upright RGB at the network's input size, as the reranker saw it
    attention: np.ndarray  # (L, L) cross-graph weights: row i weighs this candidate's nodes for the query's node i
    title: str  # e.g. "reranked #1 (global #4)  P(same place) 0.93"
    correct: bool | None  # None without ground truth


MATCH_DISPLAY_HEIGHT = 240
MATCH_GAP = 40
MATCH_SHADE_FLOOR = 0.3  # brightness of the least attended regions


def save_rerank_picture(
    path: str | Path,
    query: Image.Image,
    candidates: Sequence[RerankedCandidate],
    boxes: np.ndarray,
    num_query_nodes: int,
    heading: str,
    num_lines: int = 12,
) -> None:
    """One PNG, a row per candidate: the query (left) and the candidate (right) at MATCH_DISPLAY_HEIGHT, framed
    (query grey; candidate green / red / light grey), shaded by the cross graph's attention (query regions by the
    weight of their best match, candidate regions by the weight they received; darker = less), and the
    ``num_lines`` strongest pairs (a query node among the first num_query_nodes and the candidate node it weighs
    most) joined by lines. boxes (L, 4): pixel (x0, y0, x1, y1) of every node in the images' frame."""
    scale = MATCH_DISPLAY_HEIGHT / query.height
    rows = [_match_row(query, candidate, boxes, num_query_nodes, num_lines, scale) for candidate in candidates]
    width = max(row.width for row in rows)
    canvas = Image.new("RGB", (width, LABEL_HEIGHT + sum(row.height + GAP for row in rows)), "white")
    ImageDraw.Draw(canvas).text((2, 2), heading, fill=(0, 0, 0))
    y = LABEL_HEIGHT
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height + GAP
    atomic_write(path, lambda file: canvas.save(file, format="PNG"))


def _match_row(
    query: Image.Image,
    candidate: RerankedCandidate,
    boxes: np.ndarray,
    num_query_nodes: int,
    num_lines: int,
    scale: float,
) -> Image.Image:
    """The title, then query | gap | candidate with the strongest matches drawn across."""
    attention = np.asarray(candidate.attention, dtype=np.float64)  # (L, L)
    left = ImageOps.expand(_shaded(query, boxes, attention.max(axis=1), scale), border=BORDER, fill=GREY)
    right = _shaded(candidate.image, boxes, attention.sum(axis=0), scale)
    right = ImageOps.expand(right, border=BORDER, fill=frame_colour(candidate.correct))
    row = Image.new("RGB", (left.width + MATCH_GAP + right.width, LABEL_HEIGHT + left.height), "white")
    row.paste(left, (0, LABEL_HEIGHT))
    row.paste(right, (left.width + MATCH_GAP, LABEL_HEIGHT))
    ImageDraw.Draw(row).text((2, 2), candidate.title, fill=(0, 0, 0))
    best = attention[:num_query_nodes].argmax(axis=1)  # (num_query_nodes,) the candidate node each one weighs most
    weights = attention[np.arange(num_query_nodes), best]
    strongest = np.argsort(-weights, kind="stable")[:num_lines]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2 * scale  # (L, 2) display pixels
    starts = centres[strongest] + (BORDER, LABEL_HEIGHT + BORDER)
    ends = centres[best[strongest]] + (left.width + MATCH_GAP + BORDER, LABEL_HEIGHT + BORDER)
    return _draw_lines(row, starts, ends)


def _draw_lines(image: Image.Image, starts: np.ndarray, ends: np.ndarray) -> Image.Image:
    """Lines from starts (n, 2) to ends (n, 2), each in its own hue, semi-transparent, with dots at both ends."""
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for number, (start, end) in enumerate(zip(starts, ends)):
        hue = number / max(1, len(starts))
        colour = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 1.0))
        draw.line([tuple(start), tuple(end)], fill=(*colour, 170), width=2)
        for x, y in (start, end):
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(*colour, 255), outline=(255, 255, 255, 255))
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def _shaded(image: Image.Image, boxes: np.ndarray, node_values: np.ndarray, scale: float) -> Image.Image:
    """image resized by scale, each pixel's brightness scaled by the largest value (normalised to its maximum) of the
    nodes whose box holds it, between MATCH_SHADE_FLOOR and 1."""
    values = node_values / max(float(node_values.max()), 1e-12)
    shade = np.zeros((image.height, image.width), dtype=np.float32)  # (H, W)
    for (x0, y0, x1, y1), value in zip(np.asarray(boxes).round().astype(int), values):
        region = shade[y0:y1, x0:x1]
        np.maximum(region, value, out=region)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    shade_image = Image.fromarray((shade * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
    factor = MATCH_SHADE_FLOOR + (1 - MATCH_SHADE_FLOOR) * np.asarray(shade_image, dtype=np.float32)[..., None] / 255
    pixels = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float32) * factor  # (h, w, 3)
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def save_training_curves(
    path: str | Path, epochs: Sequence[int], losses: Sequence[float], recalls: dict[str, Sequence[float]]
) -> None:
    """training_curves.png: mean loss per epoch (left) and validation R@1 per epoch (right, one line per series)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, recall_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, losses, marker="o")
    loss_axis.set(xlabel="epoch", ylabel="mean training loss", title="loss")
    for label, values in recalls.items():
        recall_axis.plot(epochs[: len(values)], values, marker="o", label=label)
    recall_axis.set(xlabel="epoch", ylabel="R@1 (%)", title="validation recall@1")
    if recalls:
        recall_axis.legend()
    for axis in (loss_axis, recall_axis):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, format="png", dpi=100))
    plt.close(figure)
