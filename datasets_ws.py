"""The datasets the scripts load: a split by name (VG-benchmark folder, native MSLS, the built-in toy world generated
on first use, or two plain folders of photos) and the two torch datasets over it, every image of a split and the
training tuples.

Index space of a split, as in the VG benchmark: [database 0..Nd-1, queries Nd..Nd+Nq-1]. The readers themselves
live in the ``places`` package.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SplitRequest:
    """Which split to load and how: the data flags of a script (split_request builds one from them).

    dataset_name: "msls" is native Mapillary SLS, "toy_world" is generated on first use, "folders" is every image
    under database_folder and queries_folder (datasets_folder and split are not used; image_size, the network input,
    only serves a warning about photo orientation), any other name is a VG-format folder under datasets_folder.
    skip_bad_images: decode every image first (num_workers DataLoader workers) and leave the unreadable ones out.
    """

    datasets_folder: str | Path
    dataset_name: str
    split: str
    positive_dist_threshold: float = 25.0
    train_positive_dist_threshold: float = 10.0  # hard positives of MSLS train
    skip_bad_images: bool = False
    num_workers: int = 0
    msls_cache_dir: str | Path | None = None
    database_folder: str | Path | None = None
    queries_folder: str | Path | None = None
    image_size: tuple[int, int] | None = None


def split_request(args: argparse.Namespace, split: str) -> SplitRequest:
    """The SplitRequest that the data flags of a parsed command line describe, for `split`."""
    folders = args.dataset_name == FOLDERS_NAME
    return SplitRequest(
        datasets_folder=args.datasets_folder,
        dataset_name=args.dataset_name,
        split=split,
        positive_dist_threshold=args.val_positive_dist_threshold,
        train_positive_dist_threshold=getattr(
            args, "train_positives_dist_threshold", SplitRequest.train_positive_dist_threshold
        ),
        skip_bad_images=args.skip_bad_images,
        num_workers=args.num_workers,
        msls_cache_dir=args.msls_cache_dir,
        database_folder=args.database_folder if folders else None,
        queries_folder=args.queries_folder if folders else None,
        image_size=args.resize if folders else None,
    )


def load_split(request: SplitRequest) -> PlaceIndex:
    """PlaceIndex of the split `request` names (SplitRequest says how each dataset name is read).

    With request.skip_bad_images the unreadable images are logged and listed in `excluded`; without it nothing is
    scanned, and an unreadable image raises BadImageError when it is loaded.
    """
    if request.dataset_name == "toy_world":
        _make_toy_world_if_missing(Path(request.datasets_folder), request.split)
    index = build_split(request)
    if request.skip_bad_images:
        unreadable = find_unreadable_images(index.absolute_paths(), num_workers=request.num_workers)
        if unreadable:
            logger.warning(
                "%s: leaving out %d unreadable images (--skip_bad_images):\n%s",
                index.name,
                len(unreadable),
                "\n".join(f"  {path}: {reason}" for path, reason in unreadable),
            )
            index = build_split(request, exclude=dict(unreadable))
        else:
            logger.info("%s: all %d images decode", index.name, len(index))
    logger.info("loaded %s", index.summary())
    return index


def build_split(request: SplitRequest, exclude: Collection[str] | Mapping[str, str] = ()) -> PlaceIndex:
    """msls.build_msls_split for "msls", folders.build_folder_split for "folders", build_vg_split for every other
    dataset name; `exclude` leaves images out (relative path -> reason)."""
    thresholds = dict(
        positive_dist_threshold=request.positive_dist_threshold,
        train_positive_dist_threshold=request.train_positive_dist_threshold,
    )
    datasets_folder = Path(request.datasets_folder)
    if request.dataset_name == FOLDERS_NAME:
        if request.database_folder is None or request.queries_folder is None:
            raise ValueError(f"dataset '{FOLDERS_NAME}' needs database_folder and queries_folder")
        return build_folder_split(
            request.database_folder,
            request.queries_folder,
            positive_dist_threshold=request.positive_dist_threshold,
            exclude=exclude,
            image_size=request.image_size,
        )
    if request.dataset_name == "msls":
        return build_msls_split(
            datasets_folder, request.split, exclude=exclude, cache_dir=request.msls_cache_dir, **thresholds
        )
    return build_vg_split(datasets_folder, request.dataset_name, request.split, exclude=exclude, **thresholds)


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
