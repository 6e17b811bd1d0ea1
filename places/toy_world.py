"""The built-in toy world: a small, deterministic, procedural VPR dataset in the VG-benchmark layout.

    <datasets_folder>/toy_world/images/{train,val,test}/{database,queries}/@east@north@...@.jpg
    <datasets_folder>/toy_world/toy_world.json      manifest, written last: config, version, counts, look-alikes

How the world is made:

* Every split lies in its own region (regions are 10 km apart in UTM), with parallel routes (polylines with gentle
  bends) 600 m apart. Along each route runs a street facade drawn once as a long strip at a fixed pixel-per-metre
  scale: sky gradient, buildings with roofs, window grids, doors, shop fronts, signs, trees, pavement and road.
* The facade is made of fixed-length *blocks*. A block's *layout* (building positions, widths, heights, wall and
  roof colours, roof shapes, trees) and its *details* (window grids and styles, doors, shop fronts, signs, lit
  windows) come from separate random streams.
* A camera standing on the route at arc length s looks sideways at the facade: an image is a crop of the strip
  centred on s, `view_width_m` wide, resized to `image_size`. Database images are taken every
  `database_spacing_m` metres in daylight. Queries are taken at random arc lengths (so the nearest database image
  is at most half a spacing away along the route), a little closer to or farther from the facade (zoom within
  about ±10 %), with a small vertical shift, a lighting (day / dusk / night: darker, tinted, lit windows), an
  exposure change, sensor noise, sometimes a slight blur, and in half of them parked vehicles or pedestrians in front
  of the ground floor (occluders the database images do not have).
* Look-alikes: some runs of `lookalike_blocks` blocks get the *layout* of a run on another route of the same split
  (hundreds of metres away) while keeping their own *details*. Their images are globally similar but differ in
  every window, door and sign, which is what local matching can tell apart. The manifest lists each run and the
  pairs of database images that show the same layout from the same relative position.

Measured 2026-11-27 on the 2-core development machine (one process, Pillow 13, quiet), with
`python3 -m places.toy_world --force`:

* default: train 768 database + 720 queries, val 165 + 210, test 192 + 300 (2355 images at 144x192), 11.8 MB, 7 s
  (the training split has the most places: the reranker needs many to learn matching that transfers; the test split
  has 300 queries, so one query is a third of a point of R@1);
* small:   train 44 + 16, val 38 + 12, test 38 + 12 (160 images), 0.8 MB, under 1 s.

Files are byte-identical for the same config on the same Pillow/libjpeg; another JPEG library may encode differently.

Usage: `python3 -m places.toy_world --datasets_folder ./data --preset default`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

logger = logging.getLogger(__name__)

TOY_WORLD_NAME = "toy_world"
MANIFEST_NAME = "toy_world.json"
GENERATOR_VERSION = 2  # bump whenever the same config starts to give other files: old worlds then get rebuilt
SPLITS = ("train", "val", "test")
LIGHTINGS = ("day", "dusk", "night")

# Independent random streams, so that changing one part of the world does not reshuffle the others.
ROUTE_STREAM, LAYOUT_STREAM, LOOKALIKE_STREAM, DETAIL_STREAM, QUERY_STREAM = 1, 2, 3, 4, 5

# Vertical layout of the facade, in metres above the building base (negative: pavement and road in front).
PAVEMENT_DEPTH_M = 1.5
SKY_TOP_RGB = (92, 142, 214)
SKY_HORIZON_RGB = (196, 218, 238)
ROAD_RGB = (72, 72, 78)
PAVEMENT_RGB = (158, 156, 150)
# Per-channel gains and the strength of lit windows for each lighting.
LIGHTING_GAINS = {"day": (1.0, 1.0, 1.0), "dusk": (0.85, 0.7, 0.6), "night": (0.36, 0.38, 0.52)}
LIT_WINDOW_STRENGTH = {"day": 0.0, "dusk": 0.4, "night": 0.7}
LIT_WINDOW_RGB = (255, 206, 120)
QUERY_TIMESTAMPS = {"day": "20250314T1100", "dusk": "20250314T1930", "night": "20250314T2300"}
DATABASE_TIMESTAMP = "20240615T1200"
# The 256 quantiles of the standard normal distribution at (i + 0.5) / 256: random bytes index them to make noise.
GAUSSIAN_QUANTILES = np.array([NormalDist().inv_cdf((index + 0.5) / 256) for index in range(256)])

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
GLASS_PALETTE = ((46, 62, 84), (70, 92, 110), (36, 40, 48), (96, 120, 140), (58, 76, 70))
SIGN_PALETTE = (
    (220, 30, 40),
    (30, 90, 200),
    (250, 200, 20),
    (20, 150, 70),
    (240, 120, 20),
    (150, 40, 170),
    (250, 250, 250),
    (20, 20, 20),
    (0, 170, 190),
    (240, 90, 160),
)
CROWN_PALETTE = ((54, 110, 48), (78, 128, 56), (40, 90, 52), (98, 140, 70))
OCCLUDER_PALETTE = ((200, 30, 30), (30, 60, 160), (230, 230, 230), (30, 30, 30), (120, 120, 128), (230, 190, 30))


@dataclass(frozen=True)
class SplitSpec:
    """Size and place of one split: `num_routes` parallel routes starting at the region's origin (UTM metres)."""

    num_routes: int
    route_length_m: float
    queries_per_route: int
    num_lookalikes: int
    origin_east_m: float
    origin_north_m: float


@dataclass(frozen=True)
class ToyWorldConfig:
    """Every parameter of the toy-world generator; the manifest stores it to recognise a world made with it."""

    seed: int = 0
    image_size: tuple[int, int] = (144, 192)  # (H, W), 4:3 like MSLS / Pitts30k at 480x640; the toy preset's input
    jpeg_quality: int = 80
    # a larger training split than the others: the reranker needs many places to learn local matching that transfers
    train: SplitSpec = SplitSpec(12, 567.0, 60, 28, 500_000.0, 5_030_000.0)
    val: SplitSpec = SplitSpec(3, 486.0, 70, 6, 510_000.0, 5_030_000.0)
    test: SplitSpec = SplitSpec(3, 567.0, 100, 7, 520_000.0, 5_030_000.0)
    lane_spacing_m: float = 600.0  # north offset between the starts of neighbouring routes
    route_segment_length_m: float = 150.0  # a route bends every this many metres
    max_route_bend_deg: float = 15.0  # each segment's direction is within this of due east
    database_spacing_m: float = 9.0
    block_length_m: float = 27.0  # facade blocks; a multiple of database_spacing_m so look-alike images align
    lookalike_blocks: int = 3  # consecutive blocks whose layout a look-alike copies
    view_width_m: float = 30.0  # facade width seen by a database image
    facade_distance_m: float = 12.0  # from the route to the facade
    camera_centre_height_m: float = 7.0  # height of the image centre on the facade
    max_lateral_offset_m: float = 1.2  # queries stand up to this much closer to / farther from the facade
    max_vertical_shift_m: float = 0.8
    pixels_per_metre: float = 10.0  # scale of the rendered facade strip
    query_lighting_weights: tuple[float, float, float] = (0.5, 0.3, 0.2)  # day, dusk, night
    exposure_range: tuple[float, float] = (0.88, 1.12)
    noise_sigma_range: tuple[float, float] = (2.0, 6.0)  # Gaussian sensor noise, in 0-255 units
    blur_probability: float = 0.3
    blur_radius_px: float = 0.7  # box blur
    occlusion_probability: float = 0.5  # a query has parked vehicles or pedestrians in front of the facade
    max_occluders: int = 2
    utm_zone_number: int = 32
    utm_zone_letter: str = "T"

    def __post_init__(self) -> None:
        check_config(self)


def check_config(config: ToyWorldConfig) -> None:
    """Raise ValueError naming the first parameter of `config` that cannot make a valid world."""
    height, width = config.image_size
    if height < 16 or width < 16:
        raise ValueError(f"ToyWorldConfig.image_size must be (H, W) with both >= 16, got {config.image_size}")
    if config.seed < 0:
        raise ValueError(f"ToyWorldConfig.seed must be >= 0 (numpy SeedSequence), got {config.seed}")
    if not 1 <= config.jpeg_quality <= 95:
        raise ValueError(f"ToyWorldConfig.jpeg_quality must be in [1, 95], got {config.jpeg_quality}")
    blocks_per_spacing = config.block_length_m / config.database_spacing_m
    if config.database_spacing_m <= 0 or abs(blocks_per_spacing - round(blocks_per_spacing)) > 1e-9:
        raise ValueError(
            f"ToyWorldConfig.block_length_m ({config.block_length_m}) must be a positive multiple of "
            f"database_spacing_m ({config.database_spacing_m}), so that look-alike database images align"
        )
    if not 0 <= config.max_lateral_offset_m < 0.5 * config.facade_distance_m:
        raise ValueError(
            f"ToyWorldConfig.max_lateral_offset_m must be in [0, facade_distance_m / 2), "
            f"got {config.max_lateral_offset_m} with facade_distance_m {config.facade_distance_m}"
        )
    if min(config.query_lighting_weights) < 0 or sum(config.query_lighting_weights) <= 0:
        raise ValueError(
            f"ToyWorldConfig.query_lighting_weights must be non-negative with a positive sum, "
            f"got {config.query_lighting_weights}"
        )
    for split_index, split in enumerate(SPLITS):
        check_split_spec(config, split)
        choose_lookalike_runs(config, split_index)  # raises if they do not fit
    check_splits_far_apart(config)


def check_split_spec(config: ToyWorldConfig, split: str) -> None:
    """Raise ValueError if split `split` of `config` is too small, or its routes could come close to each other."""
    spec: SplitSpec = getattr(config, split)
    if not 1 <= spec.num_routes <= 99 or spec.route_length_m < config.view_width_m:
        raise ValueError(
            f"ToyWorldConfig.{split} needs 1 <= num_routes <= 99 and route_length_m >= view_width_m "
            f"({config.view_width_m}), got {spec}"
        )
    if spec.queries_per_route < 0 or spec.num_lookalikes < 0:
        raise ValueError(f"ToyWorldConfig.{split} needs queries_per_route >= 0 and num_lookalikes >= 0, got {spec}")
    if spec.num_lookalikes > 0 and spec.num_routes < 2:
        raise ValueError(
            f"ToyWorldConfig.{split}: look-alikes copy between routes, so num_lookalikes > 0 "
            f"needs num_routes >= 2, got {spec}"
        )
    route_gap_m = config.lane_spacing_m - 2 * max_route_drift_m(config, spec)
    if spec.num_routes > 1 and route_gap_m < 150.0:
        raise ValueError(
            f"ToyWorldConfig.lane_spacing_m ({config.lane_spacing_m}) lets routes of {split} come "
            f"{route_gap_m:.0f} m close (expected >= 150 m); raise it or lower max_route_bend_deg"
        )


def max_route_drift_m(config: ToyWorldConfig, spec: SplitSpec) -> float:
    """Largest north-south distance a route of `spec` can wander from its start."""
    return spec.route_length_m * math.sin(math.radians(config.max_route_bend_deg))


def split_bounding_box(config: ToyWorldConfig, split: str) -> tuple[float, float, float, float]:
    """(min east, min north, max east, max north) that every camera of `split` stays inside, in UTM metres."""
    spec: SplitSpec = getattr(config, split)
    drift_m = max_route_drift_m(config, spec) + config.max_lateral_offset_m
    north_extent_m = (spec.num_routes - 1) * config.lane_spacing_m
    return (
        spec.origin_east_m - drift_m,
        spec.origin_north_m - drift_m,
        spec.origin_east_m + spec.route_length_m + drift_m,
        spec.origin_north_m + north_extent_m + drift_m,
    )


def check_splits_far_apart(config: ToyWorldConfig, min_gap_m: float = 1000.0) -> None:
    """Raise ValueError if the regions of two splits are less than `min_gap_m` apart."""
    for index, split_a in enumerate(SPLITS):
        for split_b in SPLITS[index + 1 :]:
            box_a, box_b = split_bounding_box(config, split_a), split_bounding_box(config, split_b)
            gap_east = max(box_b[0] - box_a[2], box_a[0] - box_b[2])
            gap_north = max(box_b[1] - box_a[3], box_a[1] - box_b[3])
            if max(gap_east, gap_north) < min_gap_m:
                raise ValueError(
                    f"ToyWorldConfig: the regions of {split_a} and {split_b} are less than "
                    f"{min_gap_m:.0f} m apart ({box_a} vs {box_b}); move their origins apart"
                )


# ----------------------------------------------------------------------------------------------------------------
# Random streams and routes (polylines in UTM metres).


def rng_for(config: ToyWorldConfig, *keys: int) -> np.random.Generator:
    """A random generator for one purpose, derived from the world seed and integer `keys`."""
    return np.random.default_rng([config.seed, *keys])


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


def margin_blocks(config: ToyWorldConfig) -> int:
    """Blocks drawn before the route start (and after its end) so that every view stays inside the strip."""
    widest_half_view_m = 0.5 * config.view_width_m * zoom_out_limit(config)
    return math.ceil((widest_half_view_m + 1.0) / config.block_length_m)


def zoom_out_limit(config: ToyWorldConfig) -> float:
    """Largest ratio of a query's view width to a database image's view width."""
    return config.facade_distance_m / (config.facade_distance_m - config.max_lateral_offset_m)


def num_blocks(config: ToyWorldConfig, spec: SplitSpec) -> int:
    """Blocks in the facade of one route of `spec`, margins included."""
    return math.ceil(spec.route_length_m / config.block_length_m) + 2 * margin_blocks(config)


def block_start_arc_m(config: ToyWorldConfig, block_index: int) -> float:
    """Arc length along the route where block `block_index` starts (negative inside the leading margin)."""
    return (block_index - margin_blocks(config)) * config.block_length_m


@dataclass(frozen=True)
class LookalikeRun:
    """Blocks target_block.. of target_route carry the layout of blocks source_block.. of source_route."""

    source_route: int
    source_block: int
    target_route: int
    target_block: int


def choose_lookalike_runs(config: ToyWorldConfig, split_index: int) -> list[LookalikeRun]:
    """Pick the split's look-alike runs: disjoint slots of `lookalike_blocks` blocks, source and target on two routes.

    Slots tile the part of each route between its first and last database image; shuffled, each look-alike takes
    the next free slot as its source and the next free slot on another route as its target.
    """
    split = SPLITS[split_index]
    spec: SplitSpec = getattr(config, split)
    slots_per_route = int(spec.route_length_m // config.block_length_m) // config.lookalike_blocks
    slots = [
        (route, margin_blocks(config) + slot * config.lookalike_blocks)
        for route in range(spec.num_routes)
        for slot in range(slots_per_route)
    ]
    order = rng_for(config, LOOKALIKE_STREAM, split_index).permutation(len(slots))
    free_slots = [slots[index] for index in order]
    too_many = (
        f"ToyWorldConfig.{split}: cannot place {spec.num_lookalikes} look-alikes of {config.lookalike_blocks} "
        f"blocks of {config.block_length_m} m on {spec.num_routes} routes of {spec.route_length_m} m "
        f"({len(slots)} slots); lengthen the routes or lower num_lookalikes"
    )
    runs = []
    for _ in range(spec.num_lookalikes):
        if not free_slots:
            raise ValueError(too_many)
        source = free_slots.pop(0)
        target = next((slot for slot in free_slots if slot[0] != source[0]), None)
        if target is None:
            raise ValueError(too_many)
        free_slots.remove(target)
        runs.append(LookalikeRun(source[0], source[1], target[0], target[1]))
    return runs


def copy_lookalike_layouts(config: ToyWorldConfig, runs: list[LookalikeRun], layouts: list[list[BlockLayout]]) -> None:
    """Give each run's target blocks the layout of its source blocks, in place in `layouts[route][block]`."""
    for run in runs:
        for offset in range(config.lookalike_blocks):
            layouts[run.target_route][run.target_block + offset] = layouts[run.source_route][run.source_block + offset]


# ----------------------------------------------------------------------------------------------------------------
# Facade rendering: the layout plus details drawn from each block's own stream.


@dataclass(frozen=True)
class StripGeometry:
    """Mapping from facade metres to strip pixels: x from the strip start, z up from the building base."""

    pixels_per_metre: float
    top_z_m: float
    bottom_z_m: float
    length_m: float

    def x_px(self, x_m: float) -> float:
        """Pixel column of the facade position `x_m` (also converts lengths)."""
        return x_m * self.pixels_per_metre

    def y_px(self, z_m: float) -> float:
        """Pixel row of the height `z_m`."""
        return (self.top_z_m - z_m) * self.pixels_per_metre

    @property
    def size_px(self) -> tuple[int, int]:
        """(width, height) of the strip image."""
        return (
            round(self.length_m * self.pixels_per_metre),
            round((self.top_z_m - self.bottom_z_m) * self.pixels_per_metre),
        )


def strip_top_z_m(config: ToyWorldConfig) -> float:
    """Height of the strip's top row above the building base: every view, zoomed out and shifted, fits below it."""
    height, width = config.image_size
    half_view_height_m = 0.5 * config.view_width_m * height / width * zoom_out_limit(config)
    return config.camera_centre_height_m + half_view_height_m + config.max_vertical_shift_m + 0.5


def strip_geometry(config: ToyWorldConfig, spec: SplitSpec) -> StripGeometry:
    """Strip size that holds every view of a route of `spec`; it is symmetric about the camera centre height."""
    top_z_m = strip_top_z_m(config)
    return StripGeometry(
        config.pixels_per_metre,
        top_z_m,
        2 * config.camera_centre_height_m - top_z_m,
        num_blocks(config, spec) * config.block_length_m,
    )


def draw_background(geometry: StripGeometry) -> Image.Image:
    """Sky gradient above, pavement and road below the building base line."""
    width_px, height_px = geometry.size_px
    rows = np.arange(height_px, dtype=np.float32)[:, None]
    horizon_px = geometry.y_px(0.0)
    blend = np.clip(rows / horizon_px, 0.0, 1.0)  # 0 at the top, 1 at the base line
    column = (1 - blend) * np.array(SKY_TOP_RGB) + blend * np.array(SKY_HORIZON_RGB)  # (height_px, 3)
    column[rows[:, 0] >= horizon_px] = PAVEMENT_RGB
    column[rows[:, 0] >= geometry.y_px(-PAVEMENT_DEPTH_M)] = ROAD_RGB
    strip = np.broadcast_to(column.astype(np.uint8)[:, None, :], (height_px, width_px, 3))
    return Image.fromarray(np.ascontiguousarray(strip), "RGB")


def draw_street_markings(draw: ImageDraw.ImageDraw, geometry: StripGeometry) -> None:
    """Kerb line, paving joints and a dashed road marking along the whole strip."""
    width_px, _ = geometry.size_px
    kerb_y = geometry.y_px(-PAVEMENT_DEPTH_M)
    draw.rectangle([0, kerb_y - 2, width_px, kerb_y], fill=(120, 118, 112))
    for x_m in np.arange(0.0, geometry.length_m, 1.5):
        draw.line([geometry.x_px(x_m), geometry.y_px(0.0), geometry.x_px(x_m), kerb_y], fill=(140, 138, 132))
    dash_y = geometry.y_px(-PAVEMENT_DEPTH_M - 1.6)
    for x_m in np.arange(0.0, geometry.length_m, 6.0):
        draw.rectangle([geometry.x_px(x_m), dash_y, geometry.x_px(x_m + 3.0), dash_y + 3], fill=(226, 226, 220))


def draw_building_body(
    draw: ImageDraw.ImageDraw, geometry: StripGeometry, building: BuildingLayout, block_start_m: float
) -> None:
    """Wall and roof (gable or cornice) of one building."""
    x0, x1 = (
        geometry.x_px(block_start_m + building.start_m),
        geometry.x_px(block_start_m + building.start_m + building.width_m),
    )
    top_y = geometry.y_px(building.height_m)
    draw.rectangle([x0, top_y, x1, geometry.y_px(0.0)], fill=building.wall_rgb)
    if building.gabled:
        ridge_y = geometry.y_px(building.height_m + min(0.3 * building.width_m, 3.0))
        overhang_px = geometry.x_px(0.3)
        draw.polygon(
            [(x0 - overhang_px, top_y), (x1 + overhang_px, top_y), ((x0 + x1) / 2, ridge_y)], fill=building.roof_rgb
        )
    else:
        draw.rectangle(
            [x0, geometry.y_px(building.height_m + 0.3), x1, geometry.y_px(building.height_m - 0.4)],
            fill=building.roof_rgb,
        )


def draw_window(
    draw: ImageDraw.ImageDraw,
    mask: ImageDraw.ImageDraw,
    box: tuple[float, float, float, float],
    style: int,
    glass_rgb: tuple,
    frame_rgb: tuple,
    lit: bool,
) -> None:
    """One window in pixel box (x0, y0, x1, y1): 0 plain, 1 cross bars, 2 shutters, 3 arched top."""
    x0, y0, x1, y1 = box
    if style == 3:
        draw.ellipse([x0, y0 - (x1 - x0) / 2, x1, y0 + (x1 - x0) / 2], fill=glass_rgb)
        mask.ellipse([x0, y0 - (x1 - x0) / 2, x1, y0 + (x1 - x0) / 2], fill=255 if lit else 0)
    draw.rectangle(box, fill=glass_rgb, outline=frame_rgb, width=1)
    mask.rectangle(box, fill=255 if lit else 0)
    if style == 1:
        draw.line([(x0 + x1) / 2, y0, (x0 + x1) / 2, y1], fill=frame_rgb, width=2)
        draw.line([x0, (y0 + y1) / 2, x1, (y0 + y1) / 2], fill=frame_rgb, width=2)
    elif style == 2:
        shutter_px = (x1 - x0) / 2
        draw.rectangle([x0 - shutter_px, y0, x0 - 1, y1], fill=frame_rgb)
        draw.rectangle([x1 + 1, y0, x1 + shutter_px, y1], fill=frame_rgb)


def draw_sign(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: tuple[float, float], size_px: float) -> None:
    """A small distinctive sign: a coloured disc, square, triangle or diamond with a contrasting glyph inside."""
    cx, cy = centre
    half = size_px / 2
    colour, glyph_colour = (SIGN_PALETTE[int(i)] for i in rng.choice(len(SIGN_PALETTE), size=2, replace=False))
    shape = int(rng.integers(4))
    outline = [(cx - half, cy - half), (cx + half, cy + half)]
    if shape == 0:
        draw.ellipse(outline, fill=colour)
    elif shape == 1:
        draw.rectangle(outline, fill=colour)
    elif shape == 2:
        draw.polygon([(cx - half, cy + half), (cx + half, cy + half), (cx, cy - half)], fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=colour)
    glyph = int(rng.integers(3))
    inner = half * 0.45
    if glyph == 0:
        draw.rectangle([cx - inner, cy - inner / 3, cx + inner, cy + inner / 3], fill=glyph_colour)
    elif glyph == 1:
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=glyph_colour)
    else:
        draw.rectangle([cx - inner / 3, cy - inner, cx + inner / 3, cy + inner], fill=glyph_colour)


def draw_building_details(
    draw: ImageDraw.ImageDraw,
    mask: ImageDraw.ImageDraw,
    geometry: StripGeometry,
    building: BuildingLayout,
    block_start_m: float,
    rng: np.random.Generator,
) -> None:
    """Window grid, door or shop front, and signs of one building, all drawn from `rng`."""
    floor_height_m = rng.uniform(3.0, 3.6)
    num_floors = max(1, int((building.height_m - 0.8) // floor_height_m))
    window_pitch_m = rng.uniform(1.8, 3.0)
    num_columns = max(1, int((building.width_m - 1.0) // window_pitch_m))
    column_step_m = building.width_m / num_columns
    window_width_m = min(window_pitch_m, column_step_m) * rng.uniform(0.38, 0.6)
    window_height_m = floor_height_m * rng.uniform(0.38, 0.58)
    style = int(rng.integers(4))
    glass_rgb = jitter_colour(rng, pick(rng, GLASS_PALETTE), 12)
    frame_rgb = jitter_colour(rng, (int(rng.integers(30, 240)),) * 3, 30)
    left_m = block_start_m + building.start_m
    for floor in range(1, num_floors):
        bottom_m = floor * floor_height_m + 0.5 * (floor_height_m - window_height_m)
        for column in range(num_columns):
            centre_m = left_m + (column + 0.5) * column_step_m
            box = (
                geometry.x_px(centre_m - window_width_m / 2),
                geometry.y_px(bottom_m + window_height_m),
                geometry.x_px(centre_m + window_width_m / 2),
                geometry.y_px(bottom_m),
            )
            draw_window(draw, mask, box, style, glass_rgb, frame_rgb, lit=bool(rng.random() < 0.35))
    draw_ground_floor(draw, mask, geometry, building, left_m, column_step_m, num_columns, rng)
    for _ in range(int(rng.integers(0, 3))):
        size_m = rng.uniform(0.8, 1.5)
        centre_m = left_m + rng.uniform(size_m, max(size_m, building.width_m - size_m))
        height_m = rng.uniform(2.8, max(2.8, min(building.height_m - 1.0, 5.5)))
        draw_sign(draw, rng, (geometry.x_px(centre_m), geometry.y_px(height_m)), size_m * geometry.pixels_per_metre)


def draw_ground_floor(
    draw: ImageDraw.ImageDraw,
    mask: ImageDraw.ImageDraw,
    geometry: StripGeometry,
    building: BuildingLayout,
    left_m: float,
    column_step_m: float,
    num_columns: int,
    rng: np.random.Generator,
) -> None:
    """Either a shop front (glass and striped awning) or a door with plain windows beside it."""
    if rng.random() < 0.35 and building.width_m > 5.0:
        x0, x1 = geometry.x_px(left_m + 0.8), geometry.x_px(left_m + building.width_m - 0.8)
        glass_box = (x0, geometry.y_px(2.4), x1, geometry.y_px(0.3))
        draw.rectangle(glass_box, fill=jitter_colour(rng, (60, 74, 84), 20), outline=(30, 30, 30), width=2)
        mask.rectangle(glass_box, fill=255 if rng.random() < 0.7 else 0)
        stripe_colours = [SIGN_PALETTE[int(i)] for i in rng.choice(len(SIGN_PALETTE), size=2, replace=False)]
        stripe_px = geometry.x_px(rng.uniform(0.4, 0.9))
        for index, stripe_x in enumerate(np.arange(x0, x1, stripe_px)):
            draw.rectangle(
                [stripe_x, geometry.y_px(3.1), min(stripe_x + stripe_px, x1), geometry.y_px(2.5)],
                fill=stripe_colours[index % 2],
            )
        return
    door_column = int(rng.integers(num_columns))
    door_width_m = rng.uniform(1.1, 1.7)
    door_rgb = jitter_colour(rng, pick(rng, SIGN_PALETTE + ROOF_PALETTE), 20)
    for column in range(num_columns):
        centre_m = left_m + (column + 0.5) * column_step_m
        if column == door_column:
            draw.rectangle(
                [
                    geometry.x_px(centre_m - door_width_m / 2),
                    geometry.y_px(rng.uniform(2.2, 2.6)),
                    geometry.x_px(centre_m + door_width_m / 2),
                    geometry.y_px(0.0),
                ],
                fill=door_rgb,
            )
        else:
            box = (geometry.x_px(centre_m - 0.5), geometry.y_px(2.2), geometry.x_px(centre_m + 0.5), geometry.y_px(0.9))
            draw.rectangle(box, fill=(52, 60, 70), outline=(30, 30, 30), width=1)
            mask.rectangle(box, fill=255 if rng.random() < 0.4 else 0)


def tree_boxes(geometry: StripGeometry, tree: TreeLayout, block_start_m: float) -> tuple[list[float], list[float]]:
    """Pixel boxes [x0, y0, x1, y1] of the trunk and of the round crown of one tree standing on the pavement."""
    centre_x = geometry.x_px(block_start_m + tree.centre_m)
    trunk_half_px = geometry.x_px(0.18)
    crown_centre_y = geometry.y_px(tree.trunk_height_m + tree.crown_radius_m)
    radius_px = geometry.x_px(tree.crown_radius_m)
    trunk_box = [centre_x - trunk_half_px, crown_centre_y, centre_x + trunk_half_px, geometry.y_px(-0.6)]
    crown_box = [centre_x - radius_px, crown_centre_y - radius_px, centre_x + radius_px, crown_centre_y + radius_px]
    return trunk_box, crown_box


def render_facade(
    config: ToyWorldConfig, split_index: int, route_index: int, layouts: list[BlockLayout]
) -> tuple[Image.Image, Image.Image]:
    """The route's facade strip (RGB) and its lit-window mask (L, 255 where a window lights up at night)."""
    spec: SplitSpec = getattr(config, SPLITS[split_index])
    geometry = strip_geometry(config, spec)
    strip = draw_background(geometry)
    lit_mask = Image.new("L", geometry.size_px, 0)
    draw, mask_draw = ImageDraw.Draw(strip), ImageDraw.Draw(lit_mask)
    draw_street_markings(draw, geometry)
    for block_index, layout in enumerate(layouts):
        block_start_m = block_index * config.block_length_m  # strip metres, not arc length
        details_rng = rng_for(config, DETAIL_STREAM, split_index, route_index, block_index)
        for building in layout.buildings:
            draw_building_body(draw, geometry, building, block_start_m)
            draw_building_details(draw, mask_draw, geometry, building, block_start_m, details_rng)
    for block_index, layout in enumerate(layouts):  # trees last: they stand in front of every building
        for tree in layout.trees:
            trunk_box, crown_box = tree_boxes(geometry, tree, block_index * config.block_length_m)
            draw.rectangle(trunk_box, fill=(92, 66, 44))
            draw.ellipse(crown_box, fill=tree.crown_rgb)
            mask_draw.rectangle(trunk_box, fill=0)
            mask_draw.ellipse(crown_box, fill=0)
    return strip, lit_mask


# ----------------------------------------------------------------------------------------------------------------
# Views: database images and queries.


@dataclass(frozen=True)
class View:
    """One image to render: where the camera stands, how it sees the facade, and its lighting."""

    arc_length_m: float
    lateral_offset_m: float  # towards the facade
    vertical_shift_m: float
    lighting: str


def database_views(config: ToyWorldConfig, spec: SplitSpec) -> list[View]:
    """Daylight views every `database_spacing_m` along a route of `spec`, from its start to its end."""
    count = int(spec.route_length_m // config.database_spacing_m) + 1
    return [View(index * config.database_spacing_m, 0.0, 0.0, "day") for index in range(count)]


def query_views(config: ToyWorldConfig, split_index: int, route_index: int) -> list[View]:
    """Views at random arc lengths between the first and the last database image of a route, shifted sideways and
    vertically, under random lightings; sorted along the route."""
    spec: SplitSpec = getattr(config, SPLITS[split_index])
    rng = rng_for(config, QUERY_STREAM, split_index, route_index)
    weights = np.array(config.query_lighting_weights) / sum(config.query_lighting_weights)
    last_database_arc_m = database_views(config, spec)[-1].arc_length_m
    views = []
    for _ in range(spec.queries_per_route):
        views.append(
            View(
                arc_length_m=float(rng.uniform(0.0, last_database_arc_m)),
                lateral_offset_m=float(rng.uniform(-config.max_lateral_offset_m, config.max_lateral_offset_m)),
                vertical_shift_m=float(rng.uniform(-config.max_vertical_shift_m, config.max_vertical_shift_m)),
                lighting=LIGHTINGS[int(rng.choice(len(LIGHTINGS), p=weights))],
            )
        )
    return sorted(views, key=lambda view: view.arc_length_m)


def crop_box(config: ToyWorldConfig, view: View) -> tuple[float, float, float, float]:
    """Strip pixel box (x0, y0, x1, y1) seen by `view`; closer to the facade means a narrower box."""
    height, width = config.image_size
    view_width_m = config.view_width_m * (config.facade_distance_m - view.lateral_offset_m) / config.facade_distance_m
    view_height_m = view_width_m * height / width
    centre_x_m = view.arc_length_m + margin_blocks(config) * config.block_length_m
    centre_y_m = strip_top_z_m(config) - (config.camera_centre_height_m + view.vertical_shift_m)
    scale = config.pixels_per_metre
    return (
        (centre_x_m - view_width_m / 2) * scale,
        (centre_y_m - view_height_m / 2) * scale,
        (centre_x_m + view_width_m / 2) * scale,
        (centre_y_m + view_height_m / 2) * scale,
    )


def render_database_image(config: ToyWorldConfig, strip: Image.Image, view: View) -> Image.Image:
    """A clean daylight crop of the strip."""
    height, width = config.image_size
    return strip.resize((width, height), Image.Resampling.BILINEAR, box=crop_box(config, view))


def render_query_image(
    config: ToyWorldConfig, strip: Image.Image, lit_mask: Image.Image, view: View, rng: np.random.Generator
) -> Image.Image:
    """A crop of the strip under the view's lighting, with an exposure change, optional blur and sensor noise."""
    height, width = config.image_size
    box = crop_box(config, view)
    image = strip.resize((width, height), Image.Resampling.BILINEAR, box=box)
    if rng.random() < config.occlusion_probability:
        draw_occluders(ImageDraw.Draw(image), rng, (height, width), int(rng.integers(1, config.max_occluders + 1)))
    if rng.random() < config.blur_probability:
        image = image.filter(ImageFilter.BoxBlur(config.blur_radius_px))
    exposure = rng.uniform(*config.exposure_range)
    image = image.point(channel_gain_table(LIGHTING_GAINS[view.lighting], exposure))
    lit_strength = LIT_WINDOW_STRENGTH[view.lighting]
    if lit_strength > 0:
        lit_weight = lit_mask.resize((width, height), Image.Resampling.BILINEAR, box=box)
        lit_weight = lit_weight.point([round(value * lit_strength) for value in range(256)])
        lit_rgb = tuple(min(255, round(channel * exposure)) for channel in LIT_WINDOW_RGB)
        image = Image.composite(Image.new("RGB", image.size, lit_rgb), image, lit_weight)
    return add_sensor_noise(image, rng.uniform(*config.noise_sigma_range), rng)


def draw_occluders(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: tuple[int, int], count: int) -> None:
    """`count` occluders near the camera, in image pixels of `size` (H, W): parked vehicles (a body, a cabin with
    windows, two wheels) or pedestrians, standing at the bottom of the view in front of the ground floor."""
    height, width = size
    for _ in range(count):
        colour = jitter_colour(rng, pick(rng, OCCLUDER_PALETTE), 20)
        centre_x = rng.uniform(0.0, width)
        if rng.random() < 0.6:  # a vehicle
            half_width, bottom = rng.uniform(0.11, 0.2) * width, rng.uniform(0.93, 1.0) * height
            body_top = bottom - rng.uniform(0.13, 0.2) * height
            cabin_half, cabin_top = half_width * rng.uniform(0.55, 0.8), body_top - rng.uniform(0.08, 0.12) * height
            draw.rectangle([centre_x - cabin_half, cabin_top, centre_x + cabin_half, body_top], fill=colour)
            draw.rectangle(
                [centre_x - 0.85 * cabin_half, cabin_top + 2, centre_x + 0.85 * cabin_half, body_top - 1],
                fill=(40, 48, 58),
            )
            body_bottom = bottom - 0.03 * height
            draw.rectangle([centre_x - half_width, body_top, centre_x + half_width, body_bottom], fill=colour)
            radius = 0.045 * height
            for wheel_x in (centre_x - 0.65 * half_width, centre_x + 0.65 * half_width):
                draw.ellipse([wheel_x - radius, bottom - 2 * radius, wheel_x + radius, bottom], fill=(20, 20, 22))
        else:  # a pedestrian
            half_width, bottom = rng.uniform(0.015, 0.025) * width, rng.uniform(0.86, 0.97) * height
            top = bottom - rng.uniform(0.2, 0.3) * height
            head = 1.2 * half_width
            draw.ellipse([centre_x - head, top, centre_x + head, top + 2 * head], fill=(224, 182, 150))
            draw.rectangle([centre_x - half_width, top + 2 * head, centre_x + half_width, bottom], fill=colour)


def channel_gain_table(gains: tuple[float, float, float], exposure: float) -> list[int]:
    """Image.point table (3 x 256 entries) that multiplies R, G and B by their gain times `exposure`."""
    return [min(255, round(value * gain * exposure)) for gain in gains for value in range(256)]


def add_sensor_noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """`image` plus approximately Gaussian noise of standard deviation `sigma` (0-255 units), independent per pixel.

    Each noise value is a quantile of the normal distribution picked by a random byte: as random as drawing
    normals, several times faster.
    """
    noise_table = np.round(sigma * GAUSSIAN_QUANTILES).astype(np.int16)
    random_bytes = np.frombuffer(rng.bytes(image.width * image.height * 3), dtype=np.uint8)
    noise = np.take(noise_table, random_bytes).reshape(image.height, image.width, 3)
    pixels = np.asarray(image, dtype=np.int16) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def image_name(config: ToyWorldConfig, vertices: np.ndarray, view: View, pano_id: str, timestamp: str) -> str:
    """VG-benchmark file name of `view`: `@east@north@zone@letter@lat@lon@pano_id@tile@heading@pitch@roll@height
    @timestamp@note@.jpg`, with the camera's UTM position (centimetres), its compass heading and the lighting as note.
    """
    point, direction_rad = point_on_route(vertices, view.arc_length_m)
    east_m, north_m = point + view.lateral_offset_m * np.array([-math.sin(direction_rad), math.cos(direction_rad)])
    latitude, longitude = approximate_lat_lon(east_m, north_m, config.utm_zone_number)
    heading = camera_heading_deg(direction_rad)
    return (
        f"@{east_m:.2f}@{north_m:.2f}@{config.utm_zone_number}@{config.utm_zone_letter}@{latitude:.6f}"
        f"@{longitude:.6f}@{pano_id}@0@{heading:.1f}@0@0@2.5@{timestamp}@{view.lighting}@.jpg"
    )


# Built-in sizes; the numbers above the module measure them.
PRESETS: dict[str, ToyWorldConfig] = {
    "default": ToyWorldConfig(),
    "small": ToyWorldConfig(
        train=SplitSpec(2, 189.0, 8, 1, 500_000.0, 5_030_000.0),
        val=SplitSpec(2, 162.0, 6, 1, 510_000.0, 5_030_000.0),
        test=SplitSpec(2, 162.0, 6, 1, 520_000.0, 5_030_000.0),
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Writing the world, and recognising a complete one.


def expected_counts(config: ToyWorldConfig) -> dict[str, dict[str, int]]:
    """Number of database images and queries of every split."""
    counts = {}
    for split in SPLITS:
        spec: SplitSpec = getattr(config, split)
        counts[split] = {
            "database": spec.num_routes * len(database_views(config, spec)),
            "queries": spec.num_routes * spec.queries_per_route,
        }
    return counts


def config_as_json(config: ToyWorldConfig) -> dict:
    """`config` as plain JSON data (tuples become lists), the form the manifest stores and compares."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_json(data: dict) -> ToyWorldConfig:
    """The ToyWorldConfig stored in a manifest (the inverse of config_as_json); parameters that the manifest's
    generator version did not have take their defaults."""
    known = {field.name: field for field in dataclasses.fields(ToyWorldConfig)}
    values = {}
    for name, value in data.items():
        if name not in known:
            continue  # a parameter an older version had and this one dropped
        if name in SPLITS:
            value = SplitSpec(**value)
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return ToyWorldConfig(**values)


def read_manifest(world_folder: str | Path) -> dict | None:
    """The manifest of the toy world in `world_folder`, or None if it is missing or not valid JSON."""
    manifest_path = Path(world_folder) / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    try:
        return json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        logger.warning("Toy-world manifest %s is not valid JSON (%s); the world will be rebuilt", manifest_path, error)
        return None


def is_complete_world(world_folder: Path, config: ToyWorldConfig) -> bool:
    """True if `world_folder` holds a world made by this generator version with `config`, with every image present."""
    manifest = read_manifest(world_folder)
    if manifest is None:
        logger.info("no finished toy world in %s (no valid manifest): making it", world_folder)
        return False
    if manifest.get("generator_version") != GENERATOR_VERSION or manifest.get("config") != config_as_json(config):
        logger.info("Toy world in %s was made by another generator version or config", world_folder)
        return False
    for split, folder_counts in expected_counts(config).items():
        for folder, expected in folder_counts.items():
            found = len(list((world_folder / "images" / split / folder).glob("*.jpg")))
            if found != expected:
                logger.info(
                    "Toy world in %s is incomplete: %s/%s has %d images, expected %d",
                    world_folder,
                    split,
                    folder,
                    found,
                    expected,
                )
                return False
    return True


def remove_generated_files(world_folder: Path) -> None:
    """Delete what this generator owns in `world_folder` (manifest first, then images/); leave everything else."""
    for manifest_path in (world_folder / MANIFEST_NAME, world_folder / (MANIFEST_NAME + ".tmp")):
        manifest_path.unlink(missing_ok=True)
    images_folder = world_folder / "images"
    if images_folder.exists():
        logger.info("Removing %s", images_folder)
        shutil.rmtree(images_folder)


def save_jpeg(image: Image.Image, path: Path, config: ToyWorldConfig) -> None:
    """Save `image` as a baseline JPEG with optimised Huffman tables (about 9 % smaller, same pixels)."""
    image.save(path, format="JPEG", quality=config.jpeg_quality, optimize=True)


def write_route(
    config: ToyWorldConfig,
    split_index: int,
    route_index: int,
    layouts: list[BlockLayout],
    split_folder: Path,
    progress_bar: tqdm,
) -> list[str]:
    """Render and save the database images and queries of one route; return the database file names in order."""
    spec: SplitSpec = getattr(config, SPLITS[split_index])
    vertices = make_route_vertices(config, split_index, route_index)
    strip, lit_mask = render_facade(config, split_index, route_index, layouts)
    pano_prefix = f"toy{split_index}-{route_index:02d}-"  # then the image number: unique in the whole world
    database_names = []
    for image_index, view in enumerate(database_views(config, spec)):
        name = image_name(config, vertices, view, f"{pano_prefix}{image_index:04d}", DATABASE_TIMESTAMP)
        save_jpeg(render_database_image(config, strip, view), split_folder / "database" / name, config)
        database_names.append(name)
        progress_bar.update()
    noise_rng = rng_for(config, QUERY_STREAM, split_index, route_index, 1)
    for image_index, view in enumerate(query_views(config, split_index, route_index), start=len(database_names)):
        name = image_name(config, vertices, view, f"{pano_prefix}{image_index:04d}", QUERY_TIMESTAMPS[view.lighting])
        save_jpeg(render_query_image(config, strip, lit_mask, view, noise_rng), split_folder / "queries" / name, config)
        progress_bar.update()
    return database_names


def write_split(config: ToyWorldConfig, split_index: int, split_folder: Path, progress_bar: tqdm) -> list[dict]:
    """Lay out, render and save every route of one split; return the manifest records of its look-alikes."""
    spec: SplitSpec = getattr(config, SPLITS[split_index])
    layout_rng = rng_for(config, LAYOUT_STREAM, split_index)
    layouts = [
        [draw_block_layout(layout_rng, config.block_length_m) for _ in range(num_blocks(config, spec))]
        for _ in range(spec.num_routes)
    ]
    runs = choose_lookalike_runs(config, split_index)
    copy_lookalike_layouts(config, runs, layouts)
    database_names = [
        write_route(config, split_index, route_index, layouts[route_index], split_folder, progress_bar)
        for route_index in range(spec.num_routes)
    ]
    return [lookalike_record(config, split_index, run, database_names) for run in runs]


def lookalike_record(
    config: ToyWorldConfig, split_index: int, run: LookalikeRun, database_names: list[list[str]]
) -> dict:
    """Manifest entry of one look-alike run, with the database image pairs that see only copied blocks."""
    split = SPLITS[split_index]
    run_length_m = config.lookalike_blocks * config.block_length_m
    source_start_m = block_start_arc_m(config, run.source_block)
    target_start_m = block_start_arc_m(config, run.target_block)
    steps_per_block = round(config.block_length_m / config.database_spacing_m)
    source_vertices = make_route_vertices(config, split_index, run.source_route)
    target_vertices = make_route_vertices(config, split_index, run.target_route)
    image_pairs = []
    for view_index in range(
        round(source_start_m / config.database_spacing_m),
        round((source_start_m + run_length_m) / config.database_spacing_m) + 1,
    ):
        arc_m = view_index * config.database_spacing_m
        sees_only_copied_blocks = (
            source_start_m <= arc_m - config.view_width_m / 2
            and arc_m + config.view_width_m / 2 <= source_start_m + run_length_m
        )
        if not sees_only_copied_blocks:
            continue
        target_index = view_index + (run.target_block - run.source_block) * steps_per_block
        source_point, _ = point_on_route(source_vertices, arc_m)
        target_point, _ = point_on_route(target_vertices, target_index * config.database_spacing_m)
        image_pairs.append(
            {
                "source": f"images/{split}/database/{database_names[run.source_route][view_index]}",
                "target": f"images/{split}/database/{database_names[run.target_route][target_index]}",
                "distance_m": round(float(np.linalg.norm(source_point - target_point)), 2),
            }
        )
    return {
        "split": split,
        "source_route": run.source_route,
        "source_start_m": source_start_m,
        "target_route": run.target_route,
        "target_start_m": target_start_m,
        "length_m": run_length_m,
        "image_pairs": image_pairs,
    }


def make_toy_world(
    datasets_folder: str | Path,
    config: ToyWorldConfig = PRESETS["default"],
    *,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Write the toy world under <datasets_folder>/toy_world and return that folder.

    Idempotent: if a complete world made with the same config and generator version is there (its manifest
    `toy_world.json`, written last, matches and every folder holds the expected number of images), nothing is
    written. Otherwise (or with `force`) the files this generator owns, `images/` and the manifest, are deleted and
    the world is generated again; nothing else in the folder is touched.
    """
    world_folder = Path(datasets_folder) / TOY_WORLD_NAME
    if not force and is_complete_world(world_folder, config):
        logger.info("Toy world already complete in %s", world_folder)
        return world_folder
    start_time = time.perf_counter()
    world_folder.mkdir(parents=True, exist_ok=True)
    remove_generated_files(world_folder)
    counts = expected_counts(config)
    for split in SPLITS:
        for folder in ("database", "queries"):
            (world_folder / "images" / split / folder).mkdir(parents=True)
    total_images = sum(sum(folder_counts.values()) for folder_counts in counts.values())
    lookalikes = []
    with tqdm(total=total_images, desc="toy world", unit="img", disable=not progress) as progress_bar:
        for split_index, split in enumerate(SPLITS):
            lookalikes += write_split(config, split_index, world_folder / "images" / split, progress_bar)
    manifest = {
        "name": TOY_WORLD_NAME,
        "generator_version": GENERATOR_VERSION,
        "config": config_as_json(config),
        "counts": counts,
        "lookalikes": lookalikes,
    }
    temporary_path = world_folder / (MANIFEST_NAME + ".tmp")
    temporary_path.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary_path, world_folder / MANIFEST_NAME)
    logger.info(
        "Toy world written to %s: %d images in %.1f s", world_folder, total_images, time.perf_counter() - start_time
    )
    return world_folder


def folder_size_bytes(folder: Path) -> int:
    """Total size of the files under `folder`."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    """Command line: generate a toy world and report where it is, how many images it has and its size."""
    parser = argparse.ArgumentParser(
        description="Generate the built-in toy world, a small procedural VPR dataset in the VG-benchmark layout "
        "(<datasets_folder>/toy_world/images/{train,val,test}/{database,queries})."
    )
    parser.add_argument(
        "--datasets_folder",
        type=str,
        default="./data",
        help="folder that receives the toy_world/ dataset folder (default: ./data)",
    )
    parser.add_argument(
        "--preset",
        type=str,
        default="default",
        choices=sorted(PRESETS),
        help="size of the world: 'default' (2355 images, 12 MB, 7 s) or 'small' (about 160 "
        "images, for tests) (default: default)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed of the world; the same seed and preset give identical files (default: the preset's seed, 0)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="regenerate even if a complete world with the same settings is already there",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = PRESETS[args.preset]
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed)
    start_time = time.perf_counter()
    world_folder = make_toy_world(args.datasets_folder, config, force=args.force)
    counts = read_manifest(world_folder)["counts"]
    logger.info("Toy world in %s (%.1f s)", world_folder.resolve(), time.perf_counter() - start_time)
    for split, folder_counts in counts.items():
        logger.info("  %-5s  %4d database, %4d queries", split, folder_counts["database"], folder_counts["queries"])
    logger.info(
        "  total  %d images, %.1f MB on disk",
        sum(sum(c.values()) for c in counts.values()),
        folder_size_bytes(world_folder) / 1e6,
    )


if __name__ == "__main__":
    main()
