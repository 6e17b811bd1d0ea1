"""The toy world's geography: routes (polylines in UTM metres) and the layout of the facade blocks along them, which
look-alike runs copy from one route to another."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from places.toy_world.config import (
    LAYOUT_STREAM,
    ROUTE_STREAM,
    SPLITS,
    LookalikeRun,
    SplitSpec,
    ToyWorldConfig,
    choose_lookalike_runs,
    num_blocks,
    rng_for,
)

WALL_PALETTE = (
    (214, 196, 160),
    (176, 84, 64),
    (150, 150, 152),
    (206, 160, 78),
    (232, 228, 218),
    (152, 180, 204),
    (128, 158, 112),
    (190, 120, 140),
    (120, 96, 80),
    (222, 206, 120),
)
ROOF_PALETTE = ((96, 48, 40), (64, 64, 70), (150, 72, 48), (40, 44, 52), (110, 110, 100))
CROWN_PALETTE = ((54, 110, 48), (78, 128, 56), (40, 90, 52), (98, 140, 70))


# ----------------------------------------------------------------------------------------------------------------
# Routes.


def make_route_vertices(config: ToyWorldConfig, split_index: int, route_index: int) -> np.ndarray:
    """Vertices (num_segments + 1, 2) [east, north] of one route: segments heading roughly east, lanes stacked north."""
    spec: SplitSpec = getattr(config, SPLITS[split_index])
    rng = rng_for(config, ROUTE_STREAM, split_index, route_index)
    num_segments = math.ceil(spec.route_length_m / config.route_segment_length_m)
    max_bend = math.radians(config.max_route_bend_deg)
    directions = rng.uniform(-max_bend, max_bend, size=num_segments)
    lengths = np.full(num_segments, spec.route_length_m / num_segments)
    steps = np.stack([np.cos(directions), np.sin(directions)], axis=1) * lengths[:, None]  # (num_segments, 2)
    start = np.array([spec.origin_east_m, spec.origin_north_m + route_index * config.lane_spacing_m])
    return np.concatenate([start[None], start + np.cumsum(steps, axis=0)], axis=0)


def point_on_route(vertices: np.ndarray, arc_length_m: float) -> tuple[np.ndarray, float]:
    """The [east, north] point at `arc_length_m` along the polyline `vertices`, and the travel direction (radians)."""
    steps = np.diff(vertices, axis=0)
    lengths = np.linalg.norm(steps, axis=1)
    ends = np.cumsum(lengths)
    segment = min(int(np.searchsorted(ends, arc_length_m)), len(lengths) - 1)
    into_segment_m = arc_length_m - (ends[segment] - lengths[segment])
    point = vertices[segment] + steps[segment] * (into_segment_m / lengths[segment])
    return point, math.atan2(steps[segment, 1], steps[segment, 0])


def camera_heading_deg(travel_direction_rad: float) -> float:
    """Compass heading (degrees, 0 = north, clockwise) of a camera looking left of the travel direction."""
    travel_heading_deg = 90.0 - math.degrees(travel_direction_rad)
    return (travel_heading_deg - 90.0) % 360.0


def approximate_lat_lon(east_m: float, north_m: float, zone_number: int) -> tuple[float, float]:
    """Latitude and longitude (degrees) of a northern-hemisphere UTM point, computed on a sphere (about 0.2° off)."""
    scale_m = 0.9996 * 6_371_000.0
    x, y = (east_m - 500_000.0) / scale_m, north_m / scale_m
    latitude = math.degrees(math.asin(math.sin(y) / math.cosh(x)))
    longitude = zone_number * 6 - 183 + math.degrees(math.atan2(math.sinh(x), math.cos(y)))
    return latitude, longitude


# ----------------------------------------------------------------------------------------------------------------
# Facade layout: what look-alikes share.


@dataclass(frozen=True)
class BuildingLayout:
    """One building of a block; `start_m` is measured from the start of its block."""

    start_m: float
    width_m: float
    height_m: float
    wall_rgb: tuple[int, int, int]
    roof_rgb: tuple[int, int, int]
    gabled: bool


@dataclass(frozen=True)
class TreeLayout:
    """One tree on the pavement in front of a block; `centre_m` is measured from the start of its block."""

    centre_m: float
    trunk_height_m: float
    crown_radius_m: float
    crown_rgb: tuple[int, int, int]


@dataclass(frozen=True)
class BlockLayout:
    """Everything a look-alike copies: the buildings and the trees of one facade block."""

    buildings: tuple[BuildingLayout, ...]
    trees: tuple[TreeLayout, ...]


def jitter_colour(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    """`rgb` with each channel moved by up to ±`amount`, clipped to 0-255."""
    moved = np.clip(np.array(rgb) + rng.integers(-amount, amount + 1, size=3), 0, 255)
    return tuple(int(channel) for channel in moved)


def pick(rng: np.random.Generator, palette: tuple) -> tuple[int, int, int]:
    """One colour of `palette`, chosen uniformly."""
    return palette[int(rng.integers(len(palette)))]


def draw_block_layout(rng: np.random.Generator, block_length_m: float) -> BlockLayout:
    """Buildings filling a block from left to right (with the odd alley), and zero to two trees in front."""
    buildings = []
    position_m = 0.0
    while block_length_m - position_m >= 4.0:
        if position_m > 0 and rng.random() < 0.2:
            position_m += rng.uniform(1.0, 3.0)  # alley
        width_m = rng.uniform(6.0, 14.0)
        if block_length_m - (position_m + width_m) < 5.0:  # no sliver at the end of the block
            width_m = block_length_m - position_m
        buildings.append(
            BuildingLayout(
                start_m=position_m,
                width_m=width_m,
                height_m=rng.uniform(6.0, 16.0),
                wall_rgb=jitter_colour(rng, pick(rng, WALL_PALETTE), 18),
                roof_rgb=jitter_colour(rng, pick(rng, ROOF_PALETTE), 12),
                gabled=bool(rng.random() < 0.4),
            )
        )
        position_m += width_m
    trees = []
    for _ in range(int(rng.integers(0, 3))):
        crown_radius_m = rng.uniform(1.5, 3.0)
        trees.append(
            TreeLayout(
                centre_m=rng.uniform(crown_radius_m, block_length_m - crown_radius_m),
                trunk_height_m=rng.uniform(1.8, 3.5),
                crown_radius_m=crown_radius_m,
                crown_rgb=jitter_colour(rng, pick(rng, CROWN_PALETTE), 14),
            )
        )
    return BlockLayout(tuple(buildings), tuple(trees))


def copy_lookalike_layouts(config: ToyWorldConfig, runs: list[LookalikeRun], layouts: list[list[BlockLayout]]) -> None:
    """Give each run's target blocks the layout of its source blocks, in place in `layouts[route][block]`."""
    for run in runs:
        for offset in range(config.lookalike_blocks):
            layouts[run.target_route][run.target_block + offset] = layouts[run.source_route][run.source_block + offset]


def lay_out_split(config: ToyWorldConfig, split_index: int) -> tuple[list[list[BlockLayout]], list[LookalikeRun]]:
    """The block layouts `[route][block]` of every route of one split, look-alike runs copied, and those runs."""
    spec: SplitSpec = getattr(config, SPLITS[split_index])
    layout_rng = rng_for(config, LAYOUT_STREAM, split_index)
    layouts = [
        [draw_block_layout(layout_rng, config.block_length_m) for _ in range(num_blocks(config, spec))]
        for _ in range(spec.num_routes)
    ]
    runs = choose_lookalike_runs(config, split_index)
    copy_lookalike_layouts(config, runs, layouts)
    return layouts, runs
