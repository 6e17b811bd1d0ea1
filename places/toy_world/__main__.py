"""Command line of the toy-world generator: `python3 -m places.toy_world --datasets_folder ./data --preset default`."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from places.toy_world.config import PRESETS
from places.toy_world.writer import make_toy_world, read_manifest

logger = logging.getLogger(__name__)


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
