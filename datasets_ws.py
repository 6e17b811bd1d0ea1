"""Datasets: VG-benchmark folders, native MSLS (in msls.py) and the built-in toy world.

Evaluation side (this file, top to bottom):
  errors -> file names and UTM -> PlaceIndex (one split: database then queries) -> positives by radius ->
  leaving images out -> VG-format builder -> image loading and the unreadable-image scan -> BaseDataset ->
  load_split (the one entry point the scripts call).

Index space of a split, as in the VG benchmark: [database 0..Nd-1, queries Nd..Nd+Nq-1].
The training side (tuple dataset, mining) goes below BaseDataset.
"""
from __future__ import annotations

import glob
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.utils.data
import torchvision.transforms.functional as TF
from PIL import Image
from sklearn.neighbors import NearestNeighbors
from tqdm import tqdm

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VG_SPLITS = ("train", "val", "test")
VG_FILE_NAME_PATTERN = "@UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@lat@lon@...@.jpg"
VG_LAYOUT = "<datasets_folder>/<dataset_name>/images/{train,val,test}/{database,queries}/**/*.jpg"


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------

class BadImageError(ValueError):
    """An image file that cannot be opened and fully decoded; the message names the file and the reason."""


class DatasetError(ValueError):
    """A dataset that does not have the expected layout or content; the message names the path, the value found
    and what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# File names
# ----------------------------------------------------------------------------------------------------------------

def utm_from_filename(path: str | Path) -> tuple[float, float]:
    """(UTM east, UTM north) in metres from a VG-format file name '@east@north@...@.jpg'.

    Only the base name is parsed, so an '@' in a parent folder does not matter.
    """
    name = Path(path).name
    fields = name.split("@")
    if len(fields) < 3:
        raise DatasetError(f"cannot read UTM coordinates from file name {path}: expected the pattern "
                           f"'{VG_FILE_NAME_PATTERN}', found {len(fields) - 1} '@' in '{name}'")
    try:
        east, north = float(fields[1]), float(fields[2])
    except ValueError:
        raise DatasetError(f"cannot read UTM coordinates from file name {path}: expected numbers in the first two "
                           f"fields of '{VG_FILE_NAME_PATTERN}', found '{fields[1]}' and '{fields[2]}'") from None
    if not (np.isfinite(east) and np.isfinite(north)):
        raise DatasetError(f"UTM coordinates in file name {path} are not finite: east={east}, north={north}")
    return east, north


# ----------------------------------------------------------------------------------------------------------------
# PlaceIndex
# ----------------------------------------------------------------------------------------------------------------

@dataclass(repr=False, eq=False)
class PlaceIndex:
    """One split of one dataset: database images then queries, one index space [database..., queries...].

    Positives are database indices (0..Nd-1), one int64 array per query, sorted by distance (ties by index).
    """
    name: str                                        # e.g. "pitts30k/test", "msls/val", "toy_world/train"
    root: Path                                       # folder the image paths are relative to (made absolute)
    database_paths: list[str]                        # relative to root, posix separators
    queries_paths: list[str]
    database_utms: np.ndarray | None                 # (Nd, 2) float64 metres; None when unknown (MSLS test)
    queries_utms: np.ndarray | None                  # (Nq, 2)
    soft_positives_per_query: list[np.ndarray] | None  # within positive_dist_threshold (25 m); None: no ground truth
    hard_positives_per_query: list[np.ndarray] | None = None  # train only: within 10 m
    database_keys: list[str] = field(default_factory=list)  # image keys (file stems); filled from paths when empty
    queries_keys: list[str] = field(default_factory=list)
    database_groups: list[str] | None = None         # e.g. the MSLS city; positives never cross groups
    queries_groups: list[str] | None = None
    queries_attributes: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. MSLS "night", "sideways" (Nq,)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason) left out of this split

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()
        if not self.database_keys:
            self.database_keys = [Path(p).stem for p in self.database_paths]
        if not self.queries_keys:
            self.queries_keys = [Path(p).stem for p in self.queries_paths]
        self._check_lengths()

    def _check_lengths(self) -> None:
        """Raise ValueError when a per-image field does not have one entry per image."""
        per_image = {
            "database_keys": (len(self.database_keys), self.database_num),
            "queries_keys": (len(self.queries_keys), self.queries_num),
        }
        if self.database_utms is not None:
            per_image["database_utms"] = (len(self.database_utms), self.database_num)
            if self.database_utms.ndim != 2 or self.database_utms.shape[1] != 2:
                raise ValueError(f"{self.name}: database_utms must be (Nd, 2), got {self.database_utms.shape}")
        if self.queries_utms is not None:
            per_image["queries_utms"] = (len(self.queries_utms), self.queries_num)
            if self.queries_utms.ndim != 2 or self.queries_utms.shape[1] != 2:
                raise ValueError(f"{self.name}: queries_utms must be (Nq, 2), got {self.queries_utms.shape}")
        for field_name in ("soft_positives_per_query", "hard_positives_per_query", "queries_groups"):
            value = getattr(self, field_name)
            if value is not None:
                per_image[field_name] = (len(value), self.queries_num)
        if self.database_groups is not None:
            per_image["database_groups"] = (len(self.database_groups), self.database_num)
        for attribute_name, values in self.queries_attributes.items():
            per_image[f"queries_attributes['{attribute_name}']"] = (len(values), self.queries_num)
        for field_name, (found, expected) in per_image.items():
            if found != expected:
                raise ValueError(f"{self.name}: {field_name} has {found} entries, expected {expected}")

    @property
    def database_num(self) -> int:
        return len(self.database_paths)

    @property
    def queries_num(self) -> int:
        return len(self.queries_paths)

    def __len__(self) -> int:
        return self.database_num + self.queries_num

    def relative_path(self, i: int) -> str:
        """Path of the image with global index i (database first, then queries), relative to root."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.name}: image index {i} out of range [0, {len(self)})")
        if i < self.database_num:
            return self.database_paths[i]
        return self.queries_paths[i - self.database_num]

    def absolute_path(self, i: int) -> Path:
        """Path of the image with global index i (database first, then queries)."""
        return self.root / self.relative_path(i)

    def absolute_paths(self) -> list[Path]:
        """Every image of the split in index order."""
        return [self.root / p for p in self.database_paths + self.queries_paths]

    def summary(self) -> str:
        return f"< {self.name}: {self.database_num} database, {self.queries_num} queries >"

    __repr__ = summary
    __str__ = summary


# ----------------------------------------------------------------------------------------------------------------
# Positives
# ----------------------------------------------------------------------------------------------------------------

def positives_within_radius(database_utms: np.ndarray, queries_utms: np.ndarray, radius_m: float,
                            database_groups: Sequence[str] | None = None,
                            queries_groups: Sequence[str] | None = None) -> list[np.ndarray]:
    """For each query, the database indices within radius_m metres (inclusive), sorted by distance then index.

    With groups (e.g. the MSLS city), a query is compared only with database images of its own group, since UTM
    coordinates of different cities or zones are not comparable. Returns one int64 array per query.
    """
    database_utms = _checked_utms(database_utms, "database_utms")
    queries_utms = _checked_utms(queries_utms, "queries_utms")
    if (database_groups is None) != (queries_groups is None):
        raise ValueError("give groups for both database and queries, or for neither")
    if database_groups is None:
        database_group_of = np.zeros(len(database_utms), dtype=np.int64)
        queries_group_of = np.zeros(len(queries_utms), dtype=np.int64)
    else:
        database_group_of, queries_group_of = np.asarray(database_groups), np.asarray(queries_groups)
        if len(database_group_of) != len(database_utms) or len(queries_group_of) != len(queries_utms):
            raise ValueError(f"groups must have one entry per image: {len(database_group_of)} database groups for "
                             f"{len(database_utms)} images, {len(queries_group_of)} query groups for "
                             f"{len(queries_utms)} images")
    positives = [np.empty(0, dtype=np.int64) for _ in range(len(queries_utms))]
    for group in np.unique(queries_group_of):
        group_queries = np.flatnonzero(queries_group_of == group)
        group_database = np.flatnonzero(database_group_of == group)
        if len(group_database) == 0:
            continue
        knn = NearestNeighbors().fit(database_utms[group_database])
        distances, neighbours = knn.radius_neighbors(queries_utms[group_queries], radius=radius_m)
        for query, query_distances, query_neighbours in zip(group_queries, distances, neighbours):
            order = np.lexsort((query_neighbours, query_distances))
            positives[query] = group_database[query_neighbours[order]].astype(np.int64)
    return positives


def _checked_utms(utms: np.ndarray, what: str) -> np.ndarray:
    """utms as a finite (N, 2) float64 array, or ValueError."""
    utms = np.asarray(utms, dtype=np.float64)
    if utms.ndim != 2 or utms.shape[1] != 2:
        raise ValueError(f"{what} must have shape (N, 2), got {utms.shape}")
    if not np.isfinite(utms).all():
        raise ValueError(f"{what} has {int((~np.isfinite(utms)).any(axis=1).sum())} rows that are not finite")
    return utms


# ----------------------------------------------------------------------------------------------------------------
# Subsets: leaving images out, dropping queries
# ----------------------------------------------------------------------------------------------------------------

def subset_index(index: PlaceIndex, database_kept: np.ndarray, queries_kept: np.ndarray,
                 excluded: Sequence[tuple[str, str]] = ()) -> PlaceIndex:
    """index restricted to the given database and query indices (sorted), positives renumbered to the kept
    database, order of every positive list kept; `excluded` is appended to index.excluded."""
    database_kept = np.asarray(database_kept, dtype=np.int64)
    queries_kept = np.asarray(queries_kept, dtype=np.int64)
    new_database_index = np.full(index.database_num, -1, dtype=np.int64)
    new_database_index[database_kept] = np.arange(len(database_kept))

    def take(values, kept: np.ndarray):
        if values is None:
            return None
        return values[kept] if isinstance(values, np.ndarray) else [values[i] for i in kept]

    def renumbered(positives: list[np.ndarray] | None) -> list[np.ndarray] | None:
        if positives is None:
            return None
        new = [new_database_index[positives[q]] for q in queries_kept]
        return [p[p >= 0] for p in new]

    return PlaceIndex(
        name=index.name, root=index.root,
        database_paths=take(index.database_paths, database_kept),
        queries_paths=take(index.queries_paths, queries_kept),
        database_utms=take(index.database_utms, database_kept),
        queries_utms=take(index.queries_utms, queries_kept),
        soft_positives_per_query=renumbered(index.soft_positives_per_query),
        hard_positives_per_query=renumbered(index.hard_positives_per_query),
        database_keys=take(index.database_keys, database_kept),
        queries_keys=take(index.queries_keys, queries_kept),
        database_groups=take(index.database_groups, database_kept),
        queries_groups=take(index.queries_groups, queries_kept),
        queries_attributes={name: values[queries_kept] for name, values in index.queries_attributes.items()},
        excluded=list(index.excluded) + list(excluded),
    )


def drop_queries_without_positives(index: PlaceIndex, kind: str, why: str = "") -> PlaceIndex:
    """index without the queries that have no positive of this kind ("soft" or "hard"); logs how many."""
    if kind not in ("soft", "hard"):
        raise ValueError(f"kind must be 'soft' or 'hard', got {kind!r}")
    positives = index.soft_positives_per_query if kind == "soft" else index.hard_positives_per_query
    if positives is None:
        raise ValueError(f"{index.name} has no {kind} positives to select queries by")
    queries_kept = np.array([q for q, p in enumerate(positives) if len(p) > 0], dtype=np.int64)
    dropped = index.queries_num - len(queries_kept)
    if dropped == 0:
        return index
    logger.info("%s: dropped %d of %d queries without a %s positive%s", index.name, dropped, index.queries_num,
                kind, f" ({why})" if why else "")
    return subset_index(index, np.arange(index.database_num), queries_kept)


def without_images(index: PlaceIndex, exclude: Collection[str] | Mapping[str, str],
                   require_positives: str | None) -> PlaceIndex:
    """index without the images in exclude, positives renumbered, the images recorded in `excluded`.

    exclude: paths (absolute, or relative to index.root), or a mapping path -> reason. A path that is not an
    image of the split is a DatasetError. require_positives: "soft" or "hard" then drops the queries left without
    a positive of that kind (MSLS val, training splits); None keeps every query (VG val/test, MSLS test).
    """
    reasons = _exclusion_reasons(index, exclude)
    if not reasons:
        return index
    database_kept = np.array([i for i, p in enumerate(index.database_paths) if p not in reasons], dtype=np.int64)
    queries_kept = np.array([i for i, p in enumerate(index.queries_paths) if p not in reasons], dtype=np.int64)
    index = subset_index(index, database_kept, queries_kept, excluded=sorted(reasons.items()))
    if require_positives is None:
        return index
    return drop_queries_without_positives(index, require_positives, "their positives were all excluded")


def _exclusion_reasons(index: PlaceIndex, exclude: Collection[str] | Mapping[str, str]) -> dict[str, str]:
    """{relative path: reason} for exclude, checked against the images of index."""
    if isinstance(exclude, (str, Path)):
        raise TypeError(f"exclude must be a collection of paths or a mapping path -> reason, got the single path "
                        f"{exclude!r}")
    if isinstance(exclude, Mapping):
        items = list(exclude.items())
    else:
        items = [(path, "excluded by the caller") for path in exclude]
    known = set(index.database_paths) | set(index.queries_paths)
    reasons, unknown = {}, []
    for path, reason in items:
        relative = _relative_to(path, index.root)
        if relative is None or relative not in known:
            unknown.append(str(path))
        else:
            reasons[relative] = reason
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DatasetError(f"{index.name}: {len(unknown)} paths to exclude are not images of this split "
                           f"(root {index.root}): {shown}")
    return reasons


def _relative_to(path: str | Path, root: Path) -> str | None:
    """path relative to root as a posix string, or None when an absolute path lies outside root."""
    path = Path(path)
    if not path.is_absolute():
        return path.as_posix()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------------------------
# VG-benchmark-format folders
# ----------------------------------------------------------------------------------------------------------------

def build_vg_split(datasets_folder: str | Path, dataset_name: str, split: str, *,
                   positive_dist_threshold: float = 25.0, train_positive_dist_threshold: float = 10.0,
                   exclude: Collection[str] | Mapping[str, str] = ()) -> PlaceIndex:
    """PlaceIndex of <datasets_folder>/<dataset_name>/images/<split>/{database,queries}/**/*.jpg.

    Images are sorted by path; UTM comes from the file names. Soft positives: within positive_dist_threshold.
    For split "train" also hard positives (within train_positive_dist_threshold), and training queries without a
    hard positive are dropped (logged), as in the reference. exclude: see without_images.
    """
    split_folder = _vg_split_folder(Path(datasets_folder), dataset_name, split)
    database_paths = _sorted_jpgs(split_folder, "database")
    queries_paths = _sorted_jpgs(split_folder, "queries")
    database_utms = np.array([utm_from_filename(split_folder / p) for p in database_paths], dtype=np.float64)
    queries_utms = np.array([utm_from_filename(split_folder / p) for p in queries_paths], dtype=np.float64)
    soft_positives = positives_within_radius(database_utms, queries_utms, positive_dist_threshold)
    hard_positives = None
    if split == "train":
        hard_positives = positives_within_radius(database_utms, queries_utms, train_positive_dist_threshold)
    index = PlaceIndex(name=f"{dataset_name}/{split}", root=split_folder,
                       database_paths=database_paths, queries_paths=queries_paths,
                       database_utms=database_utms, queries_utms=queries_utms,
                       soft_positives_per_query=soft_positives, hard_positives_per_query=hard_positives)
    if split == "train":
        index = drop_queries_without_positives(index, "hard", f"no database image within "
                                                              f"{train_positive_dist_threshold:g} m")
    return without_images(index, exclude, "hard" if split == "train" else None)


def _vg_split_folder(datasets_folder: Path, dataset_name: str, split: str) -> Path:
    """<datasets_folder>/<dataset_name>/images/<split>, checked to hold database/ and queries/."""
    if not datasets_folder.is_dir():
        raise DatasetError(f"datasets folder {datasets_folder} not found; expected the layout {VG_LAYOUT}")
    dataset_folder = datasets_folder / dataset_name
    if not dataset_folder.is_dir():
        present = sorted(p.name for p in datasets_folder.iterdir() if p.is_dir())
        raise DatasetError(f"dataset folder {dataset_folder} not found (datasets present in {datasets_folder}: "
                           f"{present or 'none'}); expected the layout {VG_LAYOUT}")
    images_folder = dataset_folder / "images"
    if not images_folder.is_dir():
        raise DatasetError(f"folder {images_folder} not found; expected the layout {VG_LAYOUT}")
    split_folder = images_folder / split
    if not split_folder.is_dir():
        present = sorted(p.name for p in images_folder.iterdir() if p.is_dir())
        raise DatasetError(f"split '{split}' not found: no folder {split_folder}; splits present: "
                           f"{present or 'none'}; expected one of {list(VG_SPLITS)}")
    for part in ("database", "queries"):
        if not (split_folder / part).is_dir():
            raise DatasetError(f"folder {split_folder / part} not found; expected the layout {VG_LAYOUT}")
    return split_folder


def _sorted_jpgs(split_folder: Path, part: str) -> list[str]:
    """Sorted posix paths, relative to split_folder, of <split_folder>/<part>/**/*.jpg; DatasetError when none."""
    pattern = os.path.join(glob.escape(str(split_folder / part)), "**", "*.jpg")
    found = sorted(glob.glob(pattern, recursive=True))
    if not found:
        raise DatasetError(f"no .jpg images under {split_folder / part} (searched recursively); expected files "
                           f"named '{VG_FILE_NAME_PATTERN}'")
    return [Path(p).relative_to(split_folder).as_posix() for p in found]


# ----------------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------------

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_rgb_image(path: str | Path) -> Image.Image:
    """The fully decoded RGB image at path; BadImageError naming the file on any decode error."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() decodes every pixel, so truncated files fail here
    except _DECODE_ERRORS as error:
        raise BadImageError(f"cannot decode image {path}: {_describe(error)}; pass --skip_bad_images to leave "
                            f"unreadable images out") from error


def load_image(path: str | Path, image_size: tuple[int, int] | None) -> torch.Tensor:
    """(3, H, W) float32 tensor: RGB, PIL bilinear resize to image_size=(H, W) if given and different,
    then ImageNet normalisation. The same preprocessing serves training and evaluation."""
    image = open_rgb_image(path)
    if image_size is not None:
        height, width = _checked_image_size(image_size)
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
    tensor = TF.to_tensor(image)
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


def _checked_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    """(H, W) as two positive ints, or ValueError."""
    if len(image_size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in image_size):
        raise ValueError(f"image_size must be (height, width) with two positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _DecodeCheck(torch.utils.data.Dataset):
    """Item i: (path, '') when paths[i] decodes, (path, reason) when it does not."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, str]:
        try:
            open_rgb_image(self.paths[i])
        except BadImageError as error:
            return self.paths[i], _describe(error.__cause__ or error)
        return self.paths[i], ""


def _as_list(batch: list) -> list:
    return batch


def find_unreadable_images(paths: Sequence[Path], num_workers: int = 0) -> list[tuple[str, str]]:
    """(path, reason) of every image in paths that cannot be fully decoded, in the order of paths.

    Decodes every image (DataLoader workers, tqdm progress)."""
    loader = torch.utils.data.DataLoader(_DecodeCheck(paths), batch_size=32, num_workers=num_workers,
                                         collate_fn=_as_list)
    unreadable = []
    for batch in tqdm(loader, desc="checking images", unit="batch", leave=False):
        unreadable.extend((path, reason) for path, reason in batch if reason)
    return unreadable


class BaseDataset(torch.utils.data.Dataset):
    """Every image of a split, database first: item i is (image (3, H, W) float32, i)."""

    def __init__(self, index: PlaceIndex, image_size: tuple[int, int] | None):
        self.index = index
        self.image_size = None if image_size is None else _checked_image_size(image_size)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return load_image(self.index.absolute_path(i), self.image_size), i

    def __repr__(self) -> str:
        return f"BaseDataset({self.index.summary()}, image_size={self.image_size})"


# ----------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------

def load_split(datasets_folder: str | Path, dataset_name: str, split: str, *,
               positive_dist_threshold: float = 25.0, train_positive_dist_threshold: float = 10.0,
               skip_bad_images: bool = False, num_workers: int = 0,
               msls_cache_dir: str | Path | None = None) -> PlaceIndex:
    """PlaceIndex of one split: "msls" is native Mapillary SLS, "toy_world" is generated on first use, any other
    name is a VG-format folder.

    skip_bad_images: decode every image first (num_workers DataLoader workers) and leave the unreadable ones out,
    logged and listed in `excluded`. Without it nothing is scanned, and an unreadable image raises BadImageError
    when it is loaded.
    """
    datasets_folder = Path(datasets_folder)
    if dataset_name == "toy_world":
        _make_toy_world_if_missing(datasets_folder, split)
    settings = dict(positive_dist_threshold=positive_dist_threshold,
                    train_positive_dist_threshold=train_positive_dist_threshold, msls_cache_dir=msls_cache_dir)
    index = build_split(datasets_folder, dataset_name, split, **settings)
    if skip_bad_images:
        unreadable = find_unreadable_images(index.absolute_paths(), num_workers=num_workers)
        if unreadable:
            logger.warning("%s: leaving out %d unreadable images (--skip_bad_images):\n%s", index.name,
                           len(unreadable), "\n".join(f"  {path}: {reason}" for path, reason in unreadable))
            index = build_split(datasets_folder, dataset_name, split, exclude=dict(unreadable), **settings)
        else:
            logger.info("%s: all %d images decode", index.name, len(index))
    logger.info("loaded %s", index.summary())
    return index


def build_split(datasets_folder: Path, dataset_name: str, split: str, *,
                exclude: Collection[str] | Mapping[str, str] = (), positive_dist_threshold: float = 25.0,
                train_positive_dist_threshold: float = 10.0, msls_cache_dir: str | Path | None = None) -> PlaceIndex:
    """msls.build_msls_split for "msls", build_vg_split for every other dataset name."""
    thresholds = dict(positive_dist_threshold=positive_dist_threshold,
                      train_positive_dist_threshold=train_positive_dist_threshold)
    if dataset_name == "msls":
        import msls  # msls imports this module

        return msls.build_msls_split(datasets_folder, split, exclude=exclude, cache_dir=msls_cache_dir, **thresholds)
    return build_vg_split(datasets_folder, dataset_name, split, exclude=exclude, **thresholds)


def _make_toy_world_if_missing(datasets_folder: Path, split: str) -> None:
    """Generate the toy world (default config) under datasets_folder unless a finished one is there already.

    A world counts as finished when its manifest exists (the generator writes it last); an existing world made with
    another config is left alone."""
    import toy_world

    world_folder = datasets_folder / toy_world.TOY_WORLD_NAME
    if (world_folder / toy_world.MANIFEST_NAME).is_file():
        return
    logger.info("generating the toy world under %s (needed for split %s)", world_folder, split)
    datasets_folder.mkdir(parents=True, exist_ok=True)
    toy_world.make_toy_world(datasets_folder)


# ----------------------------------------------------------------------------------------------------------------
# Training tuples
# ----------------------------------------------------------------------------------------------------------------

class TupleDataset(torch.utils.data.Dataset):
    """One mining round of training tuples. Item i: (images (2 + negs, 3, H, W) = query, best positive, negatives;
    their global indices (2 + negs,)). ``queries`` are query indices, ``positives``/``negatives`` database indices."""

    def __init__(self, index: PlaceIndex, queries: np.ndarray, positives: np.ndarray, negatives: np.ndarray,
                 image_size: tuple[int, int]):
        if not len(queries) == len(positives) == len(negatives):
            raise ValueError(f"tuples disagree in length: {len(queries)} queries, {len(positives)} positives, "
                             f"{len(negatives)} negative rows")
        self.index = index
        self.image_size = _checked_image_size(image_size)
        self.image_ids = np.concatenate([index.database_num + np.asarray(queries)[:, None],
                                         np.asarray(positives)[:, None], np.asarray(negatives)], axis=1)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.image_ids[i]
        images = torch.stack([load_image(self.index.absolute_path(int(j)), self.image_size) for j in ids])
        return images, torch.from_numpy(ids)

