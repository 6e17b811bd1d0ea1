"""VG-benchmark folders (Pitts30k and others, as the VPR-datasets-downloader writes them):
<datasets_folder>/<dataset_name>/images/{train,val,test}/{database,queries}/**/*.jpg (also .jpeg, .png; listed by
places.walk), UTM (and zone, latitude and longitude) in the file names; places.geodesy picks the frame distances are
measured in."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

from places.geodesy import GeoPosition, common_frame, utm_array
from places.index import (
    VG_FILE_NAME_PATTERN,
    DatasetError,
    PlaceIndex,
    drop_queries_without_positives,
    positives_within_radius,
    utm_from_filename,
    vg_name_coordinates,
    vg_name_lat_lon,
    without_images,
)
from places.walk import IMAGE_EXTENSIONS, find_images

VG_SPLITS = ("train", "val", "test")
VG_LAYOUT = "<datasets_folder>/<dataset_name>/images/{train,val,test}/{database,queries}/**/*.jpg (or .jpeg, .png)"


def build_vg_split(
    datasets_folder: str | Path,
    dataset_name: str,
    split: str,
    *,
    positive_dist_threshold: float = 25.0,
    train_positive_dist_threshold: float = 10.0,
    exclude: Collection[str] | Mapping[str, str] = (),
) -> PlaceIndex:
    """PlaceIndex of <datasets_folder>/<dataset_name>/images/<split>/{database,queries}/**/*.jpg.

    Images are sorted by path; positions come from the file names, compared in planar UTM when the split lies in one
    zone (the benchmark's convention) and on the WGS84 ellipsoid when it spans several (places.geodesy). Soft
    positives: within positive_dist_threshold.
    For split "train" also hard positives (within train_positive_dist_threshold), and training queries without a
    hard positive are dropped (logged), as in the reference. exclude: see without_images.
    """
    split_folder = _vg_split_folder(Path(datasets_folder), dataset_name, split)
    database_paths = _sorted_jpgs(split_folder, "database")
    queries_paths = _sorted_jpgs(split_folder, "queries")
    positions = [_position_from_file_name(split_folder / p) for p in database_paths + queries_paths]
    try:
        frame = common_frame(positions, database_paths + queries_paths, f"{dataset_name}/{split}")
    except ValueError as error:
        raise DatasetError(f"{split_folder}: {error}") from None
    database_frame, queries_frame = frame.split(len(database_paths))
    soft_positives = positives_within_radius(
        database_frame.coordinates, queries_frame.coordinates, positive_dist_threshold, algorithm=frame.search_algorithm
    )
    hard_positives = None
    if split == "train":
        hard_positives = positives_within_radius(
            database_frame.coordinates,
            queries_frame.coordinates,
            train_positive_dist_threshold,
            algorithm=frame.search_algorithm,
        )
    index = PlaceIndex(
        name=f"{dataset_name}/{split}",
        root=split_folder,
        database_paths=database_paths,
        queries_paths=queries_paths,
        database_utms=utm_array(positions[: len(database_paths)]),
        queries_utms=utm_array(positions[len(database_paths) :]),
        soft_positives_per_query=soft_positives,
        hard_positives_per_query=hard_positives,
        database_ecef=database_frame.ecef,
        queries_ecef=queries_frame.ecef,
    )
    if split == "train":
        index = drop_queries_without_positives(
            index, "hard", f"no database image within {train_positive_dist_threshold:g} m"
        )
    return without_images(index, exclude, "hard" if split == "train" else None)


def _position_from_file_name(path: Path) -> GeoPosition:
    """The position in a VG-format file name; DatasetError naming the file when it has none."""
    east_north = utm_from_filename(path)
    planar = vg_name_coordinates(path.name)
    zone = None if planar is None else planar[2]
    return GeoPosition(east_north, zone, vg_name_lat_lon(path.name), from_file_name=True)


def _vg_split_folder(datasets_folder: Path, dataset_name: str, split: str) -> Path:
    """<datasets_folder>/<dataset_name>/images/<split>, checked to hold database/ and queries/."""
    if not datasets_folder.is_dir():
        raise DatasetError(f"datasets folder {datasets_folder} not found; expected the layout {VG_LAYOUT}")
    dataset_folder = datasets_folder / dataset_name
    if not dataset_folder.is_dir():
        present = sorted(p.name for p in datasets_folder.iterdir() if p.is_dir())
        raise DatasetError(
            f"dataset folder {dataset_folder} not found (datasets present in {datasets_folder}: "
            f"{present or 'none'}); expected the layout {VG_LAYOUT}"
        )
    images_folder = dataset_folder / "images"
    if not images_folder.is_dir():
        raise DatasetError(f"folder {images_folder} not found; expected the layout {VG_LAYOUT}")
    split_folder = images_folder / split
    if not split_folder.is_dir():
        present = sorted(p.name for p in images_folder.iterdir() if p.is_dir())
        raise DatasetError(
            f"split '{split}' not found: no folder {split_folder}; splits present: "
            f"{present or 'none'}; expected one of {list(VG_SPLITS)}"
        )
    for part in ("database", "queries"):
        if not (split_folder / part).is_dir():
            raise DatasetError(f"folder {split_folder / part} not found; expected the layout {VG_LAYOUT}")
    return split_folder


def _sorted_jpgs(split_folder: Path, part: str) -> list[str]:
    """Sorted posix paths, relative to split_folder, of the images under <split_folder>/<part> (places.walk: .jpg,
    .jpeg or .png, symlinked folders not followed, each image once; what was left out is logged by name);
    DatasetError when there is none."""
    listing = find_images(split_folder / part)
    listing.warn_about_skipped(split_folder / part)
    if not listing.images:
        raise DatasetError(
            f"no .jpg images under {split_folder / part} (nor {' or '.join(IMAGE_EXTENSIONS[1:])}; searched "
            f"recursively); expected files named '{VG_FILE_NAME_PATTERN}'"
        )
    return [f"{part}/{path}" for path in listing.images]
