"""The toy world's parameters: ToyWorldConfig and SplitSpec, the checks that a config makes a valid world, what
follows from a config alone (margins, blocks, where look-alike runs go), the built-in presets, and the config's JSON
form that the manifest stores."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np

TOY_WORLD_NAME = "toy_world"
MANIFEST_NAME = "toy_world.json"
GENERATOR_VERSION = 2  # bump whenever the same config starts to give other files: old worlds then get rebuilt
SPLITS = ("train", "val", "test")
LIGHTINGS = ("day", "dusk", "night")

# Independent random streams, so that changing one part of the world does not reshuffle the others.
ROUTE_STREAM, LAYOUT_STREAM, LOOKALIKE_STREAM, DETAIL_STREAM, QUERY_STREAM = 1, 2, 3, 4, 5


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
# Random streams, and the facade blocks of a route (what follows from the config alone).


def rng_for(config: ToyWorldConfig, *keys: int) -> np.random.Generator:
    """A random generator for one purpose, derived from the world seed and integer `keys`."""
    return np.random.default_rng([config.seed, *keys])


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


# ----------------------------------------------------------------------------------------------------------------
# Where look-alike runs go: check_config makes sure they fit.


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


# ----------------------------------------------------------------------------------------------------------------
# Built-in sizes (the package's docstring measures them) and the config's JSON form.


PRESETS: dict[str, ToyWorldConfig] = {
    "default": ToyWorldConfig(),
    "small": ToyWorldConfig(
        train=SplitSpec(2, 189.0, 8, 1, 500_000.0, 5_030_000.0),
        val=SplitSpec(2, 162.0, 6, 1, 510_000.0, 5_030_000.0),
        test=SplitSpec(2, 162.0, 6, 1, 520_000.0, 5_030_000.0),
    ),
}


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
