"""The datasets the scripts load: a split by name (VG-benchmark folder, native MSLS, the built-in toy world generated
on first use, or two plain folders of photos) and the two torch datasets over it, every image of a split and the
training tuples.

Index space of a split, as in the VG benchmark: [database 0..Nd-1, queries Nd..Nd+Nq-1]. The readers themselves
live in the ``places`` package.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.utils.data

from places import toy_world
from places.folders import FOLDERS_NAME, build_folder_split
from places.images import (
    PREPROCESSINGS,
    checked_image_size,
    find_unreadable_images,
    load_image,
    load_image_uint8,
    read_image_bytes,
)
from places.index import PlaceIndex
from places.msls import build_msls_split
from places.vg import build_vg_split

logger = logging.getLogger(__name__)


class ImageDataset(torch.utils.data.Dataset):
    """Every image of a split, database first: item i is (image (3, H, W) float32, i), preprocessed the 'pil' or the
    'reference' way (places.images.load_image)."""

    def __init__(self, index: PlaceIndex, image_size: tuple[int, int] | None, preprocessing: str = "pil"):
        if preprocessing not in PREPROCESSINGS:
            raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}")
        self.index = index
        self.image_size = None if image_size is None else checked_image_size(image_size)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image(self.index.absolute_path(i), self.image_size, self.preprocessing), i

    def __repr__(self) -> str:
        return f"ImageDataset({self.index.summary()}, image_size={self.image_size}, preprocessing={self.preprocessing})"


class RawImageDataset(ImageDataset):
    """What the image loop's workers ship: item i is (image (3, H, W) uint8, i) with decoder "pil", or (the file's
    bytes (n,) uint8, i) with decoder "torchvision" (decoded on the device, places.images.decode_images); with the
    'reference' preprocessing, which normalises before resizing, the finished (3, H, W) float32 image (PIL only)."""

    def __init__(
        self, index: PlaceIndex, image_size: tuple[int, int] | None, decoder: str = "pil", preprocessing: str = "pil"
    ):
        super().__init__(index, image_size, preprocessing)
        if decoder not in ("pil", "torchvision"):
            raise ValueError(f"image decoder must be 'pil' or 'torchvision', got {decoder!r}")
        if decoder == "torchvision" and preprocessing == "reference":
            raise ValueError("the reference's preprocessing resizes normalised pixels: it needs the 'pil' decoder")
        self.decoder = decoder

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.index.absolute_path(i)
        if self.preprocessing == "reference":
            return load_image(path, self.image_size, "reference"), i
        if self.decoder == "torchvision":
            return read_image_bytes(path), i
        return load_image_uint8(path, self.image_size), i


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------


def load_split(
    datasets_folder: str | Path,
    dataset_name: str,
    split: str,
    *,
    positive_dist_threshold: float = 25.0,
    train_positive_dist_threshold: float = 10.0,
    skip_bad_images: bool = False,
    num_workers: int = 0,
    msls_cache_dir: str | Path | None = None,
    database_folder: str | Path | None = None,
    queries_folder: str | Path | None = None,
    image_size: tuple[int, int] | None = None,
) -> PlaceIndex:
    """PlaceIndex of one split: "msls" is native Mapillary SLS, "toy_world" is generated on first use, "folders" is
    every image under database_folder and queries_folder (datasets_folder and split are not used; image_size, the
    network input, only serves a warning about photo orientation), any other name is a VG-format folder.

    skip_bad_images: decode every image first (num_workers DataLoader workers) and leave the unreadable ones out,
    logged and listed in `excluded`. Without it nothing is scanned, and an unreadable image raises BadImageError
    when it is loaded.
    """
    datasets_folder = Path(datasets_folder)
    if dataset_name == "toy_world":
        _make_toy_world_if_missing(datasets_folder, split)
    settings = dict(
        positive_dist_threshold=positive_dist_threshold,
        train_positive_dist_threshold=train_positive_dist_threshold,
        msls_cache_dir=msls_cache_dir,
    )
    if dataset_name == FOLDERS_NAME:
        settings.update(database_folder=database_folder, queries_folder=queries_folder, image_size=image_size)
    index = build_split(datasets_folder, dataset_name, split, **settings)
    if skip_bad_images:
        unreadable = find_unreadable_images(index.absolute_paths(), num_workers=num_workers)
        if unreadable:
            logger.warning(
                "%s: leaving out %d unreadable images (--skip_bad_images):\n%s",
                index.name,
                len(unreadable),
                "\n".join(f"  {path}: {reason}" for path, reason in unreadable),
            )
            index = build_split(datasets_folder, dataset_name, split, exclude=dict(unreadable), **settings)
        else:
            logger.info("%s: all %d images decode", index.name, len(index))
    logger.info("loaded %s", index.summary())
    return index


def build_split(
    datasets_folder: Path,
    dataset_name: str,
    split: str,
    *,
    exclude: Collection[str] | Mapping[str, str] = (),
    positive_dist_threshold: float = 25.0,
    train_positive_dist_threshold: float = 10.0,
    msls_cache_dir: str | Path | None = None,
    database_folder: str | Path | None = None,
    queries_folder: str | Path | None = None,
    image_size: tuple[int, int] | None = None,
) -> PlaceIndex:
    """msls.build_msls_split for "msls", folders.build_folder_split for "folders", build_vg_split for every other
    dataset name."""
    thresholds = dict(
        positive_dist_threshold=positive_dist_threshold, train_positive_dist_threshold=train_positive_dist_threshold
    )
    if dataset_name == FOLDERS_NAME:
        if database_folder is None or queries_folder is None:
            raise ValueError(f"dataset '{FOLDERS_NAME}' needs database_folder and queries_folder")
        return build_folder_split(
            database_folder,
            queries_folder,
            positive_dist_threshold=positive_dist_threshold,
            exclude=exclude,
            image_size=image_size,
        )
    if dataset_name == "msls":
        return build_msls_split(datasets_folder, split, exclude=exclude, cache_dir=msls_cache_dir, **thresholds)
    return build_vg_split(datasets_folder, dataset_name, split, exclude=exclude, **thresholds)


def _make_toy_world_if_missing(datasets_folder: Path, split: str) -> None:
    """Generate the toy world (default config) under datasets_folder unless a finished one is there already.

    A world counts as finished when its manifest exists (the generator writes it last); an existing world made with
    another config is left alone, but one made by an older generator version is made again with its own config
    (seed included), so that it matches what this version draws."""
    world_folder = datasets_folder / toy_world.TOY_WORLD_NAME
    manifest = toy_world.read_manifest(world_folder)
    if manifest is not None and manifest.get("generator_version") == toy_world.GENERATOR_VERSION:
        return
    datasets_folder.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        logger.info("generating the toy world under %s (needed for split %s)", world_folder, split)
        toy_world.make_toy_world(datasets_folder)
        return
    logger.info(
        "the toy world under %s was made by generator version %s; making it again with version %d",
        world_folder,
        manifest.get("generator_version"),
        toy_world.GENERATOR_VERSION,
    )
    toy_world.make_toy_world(datasets_folder, toy_world.config_from_json(manifest["config"]))


# ----------------------------------------------------------------------------------------------------------------
# Training tuples
# ----------------------------------------------------------------------------------------------------------------


class TupleDataset(torch.utils.data.Dataset):
    """One mining round of training tuples. Item i: (images (2 + negs, 3, H, W) = query, best positive, negatives;
    their global indices (2 + negs,)). ``queries`` are query indices, ``positives``/``negatives`` database indices."""

    def __init__(
        self,
        index: PlaceIndex,
        queries: np.ndarray,
        positives: np.ndarray,
        negatives: np.ndarray,
        image_size: tuple[int, int],
    ):
        if not len(queries) == len(positives) == len(negatives):
            raise ValueError(
                f"tuples disagree in length: {len(queries)} queries, {len(positives)} positives, "
                f"{len(negatives)} negative rows"
            )
        self.index = index
        self.image_size = checked_image_size(image_size)
        self.image_ids = np.concatenate(
            [index.database_num + np.asarray(queries)[:, None], np.asarray(positives)[:, None], np.asarray(negatives)],
            axis=1,
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.image_ids[i]
        images = torch.stack([load_image(self.index.absolute_path(int(j)), self.image_size) for j in ids])
        return images, torch.from_numpy(ids)
