"""report.html, one self-contained page per evaluation (docs/outputs.md): which queries reranking fixed (wrong ->
right at top-1), broke or left unchanged, the recalls and their R@N curve, and a gallery of queries filterable by
class and sortable by rank change. It comes from plain data (paths, predictions as database indices, positives), opens
from disk, and inlines every picture once as a base64 JPEG at a fixed size. ``reranking_changes`` gives the same
counts for results.json.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from metrics import first_correct_rank
from places.images import open_rgb_image
from util import atomic_write_text
from visualize import GREEN, GREY, LIGHT_GREY, RED

CLASSES = ("fixed", "broken", "unchanged-right", "unchanged-wrong")
CLASS_LABELS = {
    "fixed": "fixed (wrong → right)",
    "broken": "broken (right → wrong)",
    "unchanged-right": "unchanged, right",
    "unchanged-wrong": "unchanged, wrong",
    "all": "all queries",
}
# bins of the rank change (first correct rank global minus reranked; > 0: the first positive moved up), inclusive
RANK_CHANGE_BINS = (
    (-math.inf, -10, "-10 or less"), (-9, -5, "-9 to -5"), (-4, -2, "-4 to -2"), (-1, -1, "-1"), (0, 0, "0"),
    (1, 1, "+1"), (2, 4, "+2 to +4"), (5, 9, "+5 to +9"), (10, math.inf, "+10 or more"),
)  # fmt: skip


@dataclass
class ReportData:
    """What one evaluation produced, as plain data. Predictions are database indices, (Nq, K) each; the reranked
    ones re-sort the first ``rerank_top`` columns and keep the rest in global order."""

    split_name: str  # e.g. "msls val", shown in the title
    query_paths: Sequence[str | Path]  # absolute, to read thumbnails; (Nq,)
    database_paths: Sequence[str | Path]  # absolute; (Nd,)
    global_predictions: np.ndarray  # (Nq, K) int
    reranked_predictions: np.ndarray  # (Nq, K) int
    positives: Sequence[np.ndarray] | None  # per query, the database indices within 25 m; None: no ground truth
    global_recalls: dict[int, float] | None  # {N: percent}; None without ground truth
    reranked_recalls: dict[int, float] | None
    rerank_top: int
    correspondence_pictures: dict[int, str | Path] = field(default_factory=dict)  # query index -> PNG path


@dataclass(frozen=True)
class ReportSettings:
    """How much of the evaluation the page shows, and how heavy each picture is."""

    top_k: int = 5  # candidates shown per ranking (global, reranked) on each card
    queries_per_class: int = 30  # cards per class at most; predictions.csv has every query
    thumbnail_size: tuple[int, int] = (128, 96)  # (width, height) every image is padded into
    jpeg_quality: int = 70  # of the thumbnails
    pictures_per_class: int = 5  # region-correspondence pictures shown per class at most
    picture_max_width: int = 560  # they are scaled down to this width
    picture_quality: int = 60


# ----------------------------------------------------------------------------------------------------------------
# The numbers: which queries reranking changed


@dataclass
class QueryOutcomes:
    """Per query: the 1-based first correct rank in each ranking (K + 1: no positive in the top K) and its class."""

    global_rank: np.ndarray  # (Nq,) int
    reranked_rank: np.ndarray  # (Nq,) int
    classes: np.ndarray  # (Nq,) str, one of CLASSES


def query_outcomes(
    global_predictions: np.ndarray, reranked_predictions: np.ndarray, positives: Sequence[np.ndarray]
) -> QueryOutcomes:
    """Predictions (Nq, K) and positives per query -> each query's first correct ranks and class (right or wrong at
    top-1 before and after reranking)."""
    global_rank = first_correct_rank(global_predictions, positives) + 1
    reranked_rank = first_correct_rank(reranked_predictions, positives) + 1
    right_before, right_after = global_rank == 1, reranked_rank == 1
    classes = np.where(
        right_before,
        np.where(right_after, "unchanged-right", "broken"),
        np.where(right_after, "fixed", "unchanged-wrong"),
    )
    return QueryOutcomes(global_rank, reranked_rank, classes)


def check_predictions(
    global_predictions: np.ndarray,
    reranked_predictions: np.ndarray,
    positives: Sequence[np.ndarray] | None,
    rerank_top: int,
) -> None:
    """ValueError unless both predictions are (Nq, K) alike, positives (if any) has Nq rows and 1 <= rerank_top <= K."""
    if global_predictions.ndim != 2 or global_predictions.shape != reranked_predictions.shape:
        raise ValueError(
            f"global and reranked predictions must both be (Nq, K), got {global_predictions.shape} and "
            f"{reranked_predictions.shape}"
        )
    queries_num, k = global_predictions.shape
    if positives is not None and len(positives) != queries_num:
        raise ValueError(f"positives has {len(positives)} rows for {queries_num} queries")
    if not 1 <= rerank_top <= k:
        raise ValueError(f"rerank_top must be between 1 and K = {k}, got {rerank_top}")


def reranking_changes(
    global_predictions: np.ndarray,
    reranked_predictions: np.ndarray,
    positives: Sequence[np.ndarray] | None,
    rerank_top: int,
) -> dict | None:
    """What reranking changed, for results.json: None without ground truth, else

    ``fixed`` (wrong -> right at top-1), ``broken`` (right -> wrong), ``unchanged`` (= ``unchanged_right`` +
    ``unchanged_wrong``), ``queries_num``, ``within_reach`` (queries with a positive among the first ``rerank_top``
    global candidates: the only ones reranking can change), and ``rank_change`` over those: ``improved`` / ``same``
    / ``worsened`` counts, the ``mean`` of first correct rank global minus reranked (null when none is within
    reach) and a ``histogram`` of it in RANK_CHANGE_BINS.
    """
    if positives is None:
        return None
    check_predictions(global_predictions, reranked_predictions, positives, rerank_top)
    outcomes = query_outcomes(global_predictions, reranked_predictions, positives)
    counts = {name: int((outcomes.classes == name).sum()) for name in CLASSES}
    within_reach = outcomes.global_rank <= rerank_top
    change = (outcomes.global_rank - outcomes.reranked_rank)[within_reach]  # (within_reach,) > 0: moved up
    histogram = {label: int(((change >= low) & (change <= high)).sum()) for low, high, label in RANK_CHANGE_BINS}
    return {
        "fixed": counts["fixed"],
        "broken": counts["broken"],
        "unchanged": counts["unchanged-right"] + counts["unchanged-wrong"],
        "unchanged_right": counts["unchanged-right"],
        "unchanged_wrong": counts["unchanged-wrong"],
        "queries_num": len(outcomes.classes),
        "within_reach": int(within_reach.sum()),
        "rank_change": {
            "improved": int((change > 0).sum()),
            "same": int((change == 0).sum()),
            "worsened": int((change < 0).sum()),
            "mean": round(float(change.mean()), 4) if len(change) else None,
            "histogram": histogram,
        },
    }


def changes_summary(changes: dict | None) -> str:
    """One console line, e.g. "reranking fixed 87 queries and broke 15 (638 unchanged: 600 right, 38 wrong)"."""
    if changes is None:
        return "no ground truth for this split: no count of the queries reranking fixed or broke"

    def queries(count: int) -> str:
        return f"{count} {'query' if count == 1 else 'queries'}"

    return (
        f"reranking fixed {queries(changes['fixed'])} and broke {changes['broken']} ({changes['unchanged']} "
        f"unchanged: {changes['unchanged_right']} right, {changes['unchanged_wrong']} wrong, at top-1)"
    )


def shown_queries(
    groups: dict[str, np.ndarray], pictured: set[int], cap: int, pictures_cap: int
) -> tuple[dict[str, np.ndarray], set[int]]:
    """Per group (class name -> its query indices, ascending), at most ``cap`` queries: up to ``pictures_cap`` of
    those with a region-correspondence picture, which show it, then others; each part spread evenly over the group
    (first and last included). Returns (group -> shown queries, ascending; the queries whose picture is shown)."""

    def spread(values: np.ndarray, count: int) -> np.ndarray:
        if count >= len(values):
            return values
        return values[np.linspace(0, len(values) - 1, count).round().astype(np.int64)]

    shown, with_picture = {}, set()
    for name, members in groups.items():
        first = spread(members[np.isin(members, list(pictured))], min(cap, pictures_cap))
        rest = spread(members[~np.isin(members, first)], cap - len(first))
        shown[name] = np.sort(np.concatenate([first, rest]))
        with_picture.update(int(q) for q in first)
    return shown, with_picture


# ----------------------------------------------------------------------------------------------------------------
# Pictures, inlined once each


class InlineImages:
    """Every picture of the page as a base64 JPEG, each file once: cards refer to them by number and the page's
    script fills in the ``src`` attributes."""

    def __init__(self, settings: ReportSettings) -> None:
        self.settings = settings
        self.numbers: dict[tuple[str, str], int] = {}
        self.encoded: list[str] = []

    def thumbnail(self, path: str | Path) -> int:
        """The number of path's image padded (white) into the fixed thumbnail size."""
        return self._add(
            ("thumbnail", str(path)),
            lambda: ImageOps.pad(open_rgb_image(path), self.settings.thumbnail_size, color="white"),
        )

    def picture(self, path: str | Path) -> int:
        """The number of a region-correspondence picture, scaled down to at most picture_max_width."""

        def scaled() -> Image.Image:
            image = open_rgb_image(path)
            if image.width > self.settings.picture_max_width:
                height = max(1, round(image.height * self.settings.picture_max_width / image.width))
                image = image.resize((self.settings.picture_max_width, height), Image.BICUBIC)
            return image

        return self._add(("picture", str(path)), scaled)

    def _add(self, key: tuple[str, str], make) -> int:
        if key not in self.numbers:
            buffer = io.BytesIO()
            quality = self.settings.jpeg_quality if key[0] == "thumbnail" else self.settings.picture_quality
            make().save(buffer, format="JPEG", quality=quality)
            self.numbers[key] = len(self.encoded)
            self.encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return self.numbers[key]

    def script(self) -> str:
        """A <script> defining IMAGES, the base64 strings in number order."""
        return f"<script>const IMAGES = {json.dumps(self.encoded)};</script>"


# ----------------------------------------------------------------------------------------------------------------
# The page


def write_report(path: str | Path, data: ReportData, settings: ReportSettings = ReportSettings()) -> None:
    """Write report.html (atomically) for one evaluation: a single file, with no outside resource, that opens from
    disk in any browser."""
    atomic_write_text(path, render_page(data, settings))


def render_page(data: ReportData, settings: ReportSettings) -> str:
    """The whole HTML page of ``write_report`` as one string."""
    check_report_data(data)
    outcomes = None
    if data.positives is not None:
        outcomes = query_outcomes(data.global_predictions, data.reranked_predictions, data.positives)
    changes = reranking_changes(data.global_predictions, data.reranked_predictions, data.positives, data.rerank_top)
    images = InlineImages(settings)
    title = f"Reranking report: {data.split_name}"
    sections = [
        f"<h1>{html.escape(title)}</h1><noscript><p>The pictures, filter and sort need JavaScript.</p></noscript>",
        f"<p>{len(data.query_paths)} queries, {len(data.database_paths)} database images; the first "
        f"{data.rerank_top} global candidates of each query were reranked.</p>",
        recalls_section(data),
        changes_section(changes, data.rerank_top),
        gallery_section(data, outcomes, images, settings),
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n<link rel='icon' href='data:,'>\n"
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + f"\n{images.script()}\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


def check_report_data(data: ReportData) -> None:
    """ValueError naming what does not fit: shapes, indices out of range, recalls given for one ranking only."""
    check_predictions(data.global_predictions, data.reranked_predictions, data.positives, data.rerank_top)
    if len(data.query_paths) != len(data.global_predictions):
        raise ValueError(f"{len(data.query_paths)} query paths for {len(data.global_predictions)} rows of predictions")
    for name in ("global_predictions", "reranked_predictions"):
        values = getattr(data, name)
        if values.size and (values.min() < 0 or values.max() >= len(data.database_paths)):
            raise ValueError(f"{name} holds indices outside [0, {len(data.database_paths)}) database images")
    if (data.global_recalls is None) != (data.reranked_recalls is None):
        raise ValueError("global_recalls and reranked_recalls must both be given or both be None")
    outside = [q for q in data.correspondence_pictures if not 0 <= q < len(data.query_paths)]
    if outside:
        raise ValueError(f"correspondence pictures for queries {outside} outside [0, {len(data.query_paths)})")
    missing = [str(path) for path in data.correspondence_pictures.values() if not Path(path).is_file()]
    if missing:
        raise ValueError(f"correspondence pictures not found: {', '.join(missing)}")


def recalls_section(data: ReportData) -> str:
    """The recalls table (global, reranked, their difference in points) and the R@N curve; or a note without
    ground truth."""
    if data.global_recalls is None or data.reranked_recalls is None:
        return (
            "<h2>Recalls</h2><p class='note'>No ground truth for this split (no coordinates): no recalls and no "
            "fixed / broken classes; the gallery shows the predictions only, framed grey.</p>"
        )
    values = sorted(data.global_recalls)
    head = "".join(f"<th>R@{n}</th>" for n in values)
    rows = [
        ("global", [f"{data.global_recalls[n]:.2f}" for n in values]),
        ("reranked", [f"{data.reranked_recalls[n]:.2f}" for n in values]),
        ("reranked − global", [f"{data.reranked_recalls[n] - data.global_recalls[n]:+.2f}" for n in values]),
    ]
    body = "".join(
        f"<tr><th>{label}</th>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>" for label, cells in rows
    )
    table = f"<table class='recalls'><tr><th>%</th>{head}</tr>{body}</table>"
    return (
        f"<h2>Recalls</h2><div class='side'>{table}{recall_curve_svg(data.global_recalls, data.reranked_recalls)}</div>"
    )


SVG_WIDTH, SVG_HEIGHT = 440, 260
SVG_LEFT, SVG_RIGHT, SVG_TOP, SVG_BOTTOM = 48, 16, 30, 40  # margins around the plot, pixels
CURVE_COLOURS = {"global": "#4a6fa5", "reranked": "#e07b00"}


@dataclass(frozen=True)
class CurveAxes:
    """Pixel positions in the R@N curve: N on a log scale, recall from y_low to 100 %."""

    values: tuple[int, ...]  # the N of the recalls, ascending
    y_low: float

    def x(self, n: int) -> float:
        span = math.log(self.values[-1]) - math.log(self.values[0])
        offset = (math.log(n) - math.log(self.values[0])) / span if span else 0.5
        return SVG_LEFT + offset * (SVG_WIDTH - SVG_LEFT - SVG_RIGHT)

    def y(self, percent: float) -> float:
        return SVG_TOP + (100.0 - percent) / (100.0 - self.y_low) * (SVG_HEIGHT - SVG_TOP - SVG_BOTTOM)

    def svg(self) -> str:
        """Grid lines every 10 %, the tick labels and the axis titles."""
        parts = []
        for percent in range(int(self.y_low), 101, 10):
            y = self.y(percent)
            parts.append(f"<line class='grid' x1='{SVG_LEFT}' x2='{SVG_WIDTH - SVG_RIGHT}' y1='{y:.1f}' y2='{y:.1f}'/>")
            parts.append(f"<text x='{SVG_LEFT - 6}' y='{y + 4:.1f}' text-anchor='end'>{percent}</text>")
        for n in self.values:
            parts.append(
                f"<text x='{self.x(n):.1f}' y='{SVG_HEIGHT - SVG_BOTTOM + 16}' text-anchor='middle'>{n}</text>"
            )
        parts.append(f"<text x='{SVG_WIDTH - SVG_RIGHT}' y='{SVG_HEIGHT - 4}' text-anchor='end'>N (log scale)</text>")
        parts.append(f"<text x='4' y='{SVG_TOP - 6}'>R@N (%)</text>")
        return "".join(parts)


def recall_curve_svg(global_recalls: dict[int, float], reranked_recalls: dict[int, float]) -> str:
    """Inline SVG: R@N (%) against N (log scale) for both rankings, a dot per N with its value as a tooltip."""
    lowest = min(min(global_recalls.values()), min(reranked_recalls.values()))
    axes = CurveAxes(tuple(sorted(global_recalls)), min(90.0, 10.0 * math.floor(lowest / 10.0)))
    parts = [f"<svg class='curve' width='{SVG_WIDTH}' height='{SVG_HEIGHT}' role='img' aria-label='R@N curve'>"]
    parts.append(axes.svg())
    for row, (label, recalls) in enumerate((("global", global_recalls), ("reranked", reranked_recalls))):
        colour = CURVE_COLOURS[label]
        points = " ".join(f"{axes.x(n):.1f},{axes.y(recalls[n]):.1f}" for n in axes.values)
        parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2' points='{points}'/>")
        for n in axes.values:
            parts.append(
                f"<circle cx='{axes.x(n):.1f}' cy='{axes.y(recalls[n]):.1f}' r='3.5' fill='{colour}'>"
                f"<title>{label} R@{n} = {recalls[n]:.2f} %</title></circle>"
            )
        legend_x, legend_y = SVG_WIDTH - 120, SVG_HEIGHT - SVG_BOTTOM - 30 + 16 * row
        parts.append(f"<rect x='{legend_x}' y='{legend_y - 6}' width='20' height='3' fill='{colour}'/>")
        parts.append(f"<text x='{legend_x + 26}' y='{legend_y}'>{label}</text>")
    parts.append("</svg>")
    return "".join(parts)


def changes_section(changes: dict | None, rerank_top: int) -> str:
    """The counts of fixed / broken / unchanged queries and the histogram of the rank change; nothing without
    ground truth."""
    if changes is None:
        return ""
    boxes = "".join(
        f"<div class='count {name}'><b>{changes[key]}</b><span>{CLASS_LABELS[name]}</span></div>"
        for name, key in zip(CLASSES, ("fixed", "broken", "unchanged_right", "unchanged_wrong"))
    )
    rank_change = changes["rank_change"]
    largest = max(rank_change["histogram"].values()) or 1
    bars = "".join(
        f"<tr><th>{label}</th><td class='bar'><div style='width:{100 * count / largest:.1f}%'></div></td>"
        f"<td>{count}</td></tr>"
        for label, count in rank_change["histogram"].items()
    )
    mean = "—" if rank_change["mean"] is None else f"{rank_change['mean']:+.2f}"
    return (
        f"<h2>What reranking changed</h2><div class='counts'>{boxes}</div>"
        f"<p>Counted at top-1 over {changes['queries_num']} queries. {changes['within_reach']} had a positive among "
        f"the first {rerank_top} global candidates, the only ones reranking can change; of those, the first correct "
        f"rank moved up for {rank_change['improved']}, stayed for {rank_change['same']} and moved down for "
        f"{rank_change['worsened']} (mean change {mean}).</p>"
        f"<table class='histogram'><tr><th>rank change<br>(global − reranked)</th><th></th><th>queries</th></tr>"
        f"{bars}</table>"
    )


def gallery_section(
    data: ReportData, outcomes: QueryOutcomes | None, images: InlineImages, settings: ReportSettings
) -> str:
    """The filter and sort controls, the note on the cap, and one card per shown query."""
    if outcomes is None:
        groups = {"all": np.arange(len(data.query_paths))}
    else:
        groups = {name: np.flatnonzero(outcomes.classes == name) for name in CLASSES}
    shown, with_picture = shown_queries(
        groups, set(data.correspondence_pictures), settings.queries_per_class, settings.pictures_per_class
    )
    cards = sorted((int(q), name) for name, queries in shown.items() for q in queries)
    note = (
        f"<p class='note'>At most {settings.queries_per_class} queries per class are shown, spread evenly over the "
        f"class, among them up to {settings.pictures_per_class} with their region-correspondence picture; "
        "predictions.csv lists every query's full rankings. Each card shows the top "
        f"{settings.top_k} of both rankings, correct candidates framed green, wrong ones red.</p>"
    )
    return (
        f"<h2>Queries</h2>{gallery_controls(groups, shown, outcomes is not None)}{note}<div id='gallery'>"
        + "".join(
            card_html(query, name, data, outcomes, images, settings, query in with_picture) for query, name in cards
        )
        + "</div>"
    )


def gallery_controls(groups: dict[str, np.ndarray], shown: dict[str, np.ndarray], with_classes: bool) -> str:
    """The class filter (all, or one class: shown of total) and the sort order; only the count without classes."""
    count = "<span id='shown-count'></span>"
    if not with_classes:
        return f"<div class='controls'>{count}</div>"
    total = sum(len(members) for members in groups.values())
    options = [f"<option value='all'>all ({sum(len(q) for q in shown.values())} shown of {total})</option>"]
    options += [
        f"<option value='{name}'>{CLASS_LABELS[name]} ({len(shown[name])} shown of {len(groups[name])})</option>"
        for name in CLASSES
    ]
    orders = (
        ("query", "query number"),
        ("improved", "rank change, most improved first"),
        ("worsened", "rank change, most worsened first"),
    )
    sort = "".join(f"<option value='{value}'>{label}</option>" for value, label in orders)
    return (
        f"<div class='controls'><label>Show <select id='filter'>{''.join(options)}</select></label>"
        f"<label>Sort by <select id='sort'>{sort}</select></label>{count}</div>"
    )


def card_html(
    query: int,
    group: str,
    data: ReportData,
    outcomes: QueryOutcomes | None,
    images: InlineImages,
    settings: ReportSettings,
    with_picture: bool,
) -> str:
    """One query: its class, the rank change, the query beside its global and reranked top-K, and (with_picture)
    its region-correspondence picture."""
    positives = None if data.positives is None else data.positives[query]
    change, rank_text = 0, ""
    if outcomes is not None:
        before, after = int(outcomes.global_rank[query]), int(outcomes.reranked_rank[query])
        if before > data.global_predictions.shape[1]:
            rank_text = f"no positive in the top {data.global_predictions.shape[1]}"
        else:
            change = before - after
            rank_text = f"first correct rank {before} → {after} ({change:+d})"
    head = (
        f"<div class='card-head'><span class='badge {group}'>{CLASS_LABELS[group]}</span> <b>query {query}</b> "
        f"<span class='change'>{rank_text}</span> <span class='name'>{html.escape(Path(data.query_paths[query]).name)}"
        "</span></div>"
    )
    query_figure = figure(images.thumbnail(data.query_paths[query]), "query", "query", "query", settings)
    rankings = "".join(
        ranking_row(label, predictions[query], positives, data, images, settings)
        for label, predictions in (("global", data.global_predictions), ("reranked", data.reranked_predictions))
    )
    picture = ""
    if with_picture:
        number = images.picture(data.correspondence_pictures[query])
        picture = (
            "<details><summary>region correspondences</summary>"
            f"<img class='picture' data-image='{number}' alt='region correspondences of query {query}'></details>"
        )
    return (
        f"<div class='card' data-class='{group}' data-change='{change}' data-query='{query}'>{head}"
        f"<div class='card-body'>{query_figure}<div class='rankings'>{rankings}</div></div>{picture}</div>"
    )


def ranking_row(
    label: str,
    row: np.ndarray,
    positives: np.ndarray | None,
    data: ReportData,
    images: InlineImages,
    settings: ReportSettings,
) -> str:
    """One ranking's top-K thumbnails, framed green (correct), red (wrong) or grey (no ground truth)."""
    tiles = []
    for rank, database_index in enumerate(row[: settings.top_k], start=1):
        correct = None if positives is None else bool(np.isin(database_index, positives))
        frame = "unknown" if correct is None else "correct" if correct else "wrong"
        mark = "" if correct is None else " ✓" if correct else " ✗"
        path = data.database_paths[database_index]
        number = images.thumbnail(path)
        tiles.append(figure(number, frame, f"{rank}{mark}", f"{label} rank {rank}: {Path(path).name}", settings))
    return f"<div class='ranking'><span class='label'>{label}</span>{''.join(tiles)}</div>"


def figure(number: int, frame: str, caption: str, title: str, settings: ReportSettings) -> str:
    """A thumbnail (filled in by the page's script) with its frame class and caption."""
    width, height = settings.thumbnail_size
    return (
        f"<figure><img class='thumb {frame}' data-image='{number}' width='{width}' height='{height}' "
        f"alt='{html.escape(title, quote=True)}' title='{html.escape(title, quote=True)}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _rgb(colour: tuple[int, int, int]) -> str:
    return "rgb({}, {}, {})".format(*colour)


STYLE = (
    """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1180px; padding: 0 16px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; text-align: right; }
.recalls td, .recalls th { border-bottom: 1px solid #eee; }
.side { display: flex; gap: 32px; align-items: flex-start; flex-wrap: wrap; }
.curve text { font-size: 11px; fill: #444; } .curve .grid { stroke: #e4e4e4; }
.counts { display: flex; gap: 12px; flex-wrap: wrap; }
.count { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 130px; }
.count b { display: block; font-size: 1.6em; } .count span { color: #555; font-size: 0.9em; }
.count.fixed b { color: GREEN; } .count.broken b { color: RED; } .note { color: #555; }
.histogram .bar { width: 240px; } .histogram .bar div { background: #8a9bb0; height: 12px; }
.controls { display: flex; gap: 20px; align-items: center; margin: 8px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; margin: 10px 0; }
.card-head { margin-bottom: 6px; } .card-head .name { color: #777; font-size: 0.85em; word-break: break-all; }
.badge { border-radius: 4px; padding: 1px 6px; color: #fff; font-size: 0.85em; }
.badge.fixed { background: GREEN; } .badge.broken { background: RED; }
.badge.unchanged-right { background: #5f9e80; } .badge.unchanged-wrong { background: #a86a6a; }
.badge.all { background: #888; }
.card-body { display: flex; gap: 14px; align-items: center; }
.ranking { display: flex; align-items: flex-start; gap: 6px; margin: 2px 0; }
.ranking .label { width: 64px; font-size: 0.85em; color: #555; align-self: center; }
figure { margin: 0; text-align: center; } figcaption { font-size: 0.75em; color: #444; }
.thumb { border: 4px solid; display: block; background: #f4f4f4; }
.thumb.query { border-color: GREY; } .thumb.correct { border-color: GREEN; }
.thumb.wrong { border-color: RED; } .thumb.unknown { border-color: LIGHT_GREY; }
.picture { max-width: 100%; margin-top: 6px; } [hidden] { display: none !important; }
""".replace("LIGHT_GREY", _rgb(LIGHT_GREY))
    .replace("GREEN", _rgb(GREEN))
    .replace("GREY", _rgb(GREY))
    .replace("RED", _rgb(RED))
)

# Fills in the pictures (each inlined once in IMAGES), then shows the cards of the chosen class in the chosen order.
SCRIPT = """
document.querySelectorAll("img[data-image]").forEach((img) => {
  img.src = "data:image/jpeg;base64," + IMAGES[Number(img.dataset.image)];
});
const gallery = document.getElementById("gallery");
const cards = Array.from(gallery.children);
const filter = document.getElementById("filter");
const sort = document.getElementById("sort");
function update() {
  const chosen = filter ? filter.value : "all";
  const order = sort ? sort.value : "query";
  const byQuery = (a, b) => Number(a.dataset.query) - Number(b.dataset.query);
  const byChange = (a, b) => Number(b.dataset.change) - Number(a.dataset.change);
  const compare = {query: byQuery, improved: (a, b) => byChange(a, b) || byQuery(a, b),
                   worsened: (a, b) => byChange(b, a) || byQuery(a, b)}[order];
  let shown = 0;
  cards.slice().sort(compare).forEach((card) => {
    card.hidden = !(chosen === "all" || card.dataset.class === chosen);
    shown += card.hidden ? 0 : 1;
    gallery.appendChild(card);
  });
  document.getElementById("shown-count").textContent = shown + (shown === 1 ? " query" : " queries") + " shown";
}
[filter, sort].forEach((select) => select && select.addEventListener("change", update));
update();
"""
