"""Pictures: a query beside its top predictions (correct framed green, wrong red), and training curves; both
written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from util import atomic_write

THUMBNAIL_HEIGHT = 160
BORDER = 5
GAP = 6
LABEL_HEIGHT = 16
GREEN, RED, GREY = (40, 170, 60), (210, 40, 40), (120, 120, 120)


def _thumbnail(path: str | Path, frame: tuple[int, int, int]) -> Image.Image:
    with Image.open(path) as image:
        image = image.convert("RGB")
    width = max(1, round(image.width * THUMBNAIL_HEIGHT / image.height))
    return ImageOps.expand(image.resize((width, THUMBNAIL_HEIGHT), Image.BILINEAR), border=BORDER, fill=frame)


def save_prediction_picture(
    path: str | Path, query_path: str | Path, rows: Sequence[tuple[str, Sequence[str | Path], Sequence[bool]]]
) -> None:
    """One PNG: the query (grey frame) at the left of each row, then that row's predictions in rank order.

    rows: (label, prediction paths, is_correct per prediction), e.g. ("global", ...), ("reranked", ...).
    """
    query = _thumbnail(query_path, GREY)
    rendered = []
    for label, paths, correct in rows:
        tiles = [query] + [_thumbnail(p, GREEN if ok else RED) for p, ok in zip(paths, correct)]
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
