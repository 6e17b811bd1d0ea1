"""Writing the toy world to disk (every split, route by route, then the manifest, last) and recognising a complete
one, so that make_toy_world is idempotent."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from places.toy_world.config import (
    GENERATOR_VERSION,
    MANIFEST_NAME,
    PRESETS,
    QUERY_STREAM,
    SPLITS,
    TOY_WORLD_NAME,
    LookalikeRun,
    SplitSpec,
    ToyWorldConfig,
    block_start_arc_m,
    config_as_json,
    rng_for,
)
from places.toy_world.facade import render_facade
from places.toy_world.layout import BlockLayout, lay_out_split, make_route_vertices, point_on_route
from places.toy_world.views import (
    DATABASE_TIMESTAMP,
    QUERY_TIMESTAMPS,
    database_views,
    image_name,
    query_views,
    render_database_image,
    render_query_image,
)

logger = logging.getLogger(__name__)


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
    layouts, runs = lay_out_split(config, split_index)
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
