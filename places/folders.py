"""Plain folders of photos (``test.py --database_folder DIR --queries_folder DIR``): every image under each folder,
with ground truth when the photos say where they were taken. docs/own_photos.md describes it for users.

Images: files ending in .jpg .jpeg .png .bmp .tif .tiff .webp (any case) anywhere under the folder, sorted by path;
names starting with '.' are left out (e.g. macOS '._IMG_0001.JPG' companions, which are not images).

Coordinates of an image, the first found: a VG-format file name ('@east@north@zone@letter@lat@lon@...'), else its
EXIF GPS latitude and longitude. When every image has coordinates, positives are the database images within the radius
and recalls are reported; places.geodesy measures the distances (planar UTM for VG names in one zone, as the benchmark
does; the WGS84 ellipsoid otherwise, right across zones, the equator and the antimeridian). When none has coordinates,
there is no ground truth (predictions and pictures only); when only some have, or some cannot be placed on the Earth
(a name without zone nor latitude and longitude among several zones), there is no ground truth either, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from places.geodesy import GeoPosition, common_frame, position_from_gps, position_from_vg_name, utm_array
from places.index import DatasetError, PlaceIndex, positives_within_radius, without_images
from places.walk import find_images

logger = logging.getLogger(__name__)

FOLDERS_NAME = "folders"  # the dataset name of a split made of two plain folders
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# EXIF tags (numbers from the EXIF 2.32 standard)
ORIENTATION_TAG = 0x0112
GPS_IFD_TAG = 0x8825
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4
ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # orientations that swap width and height
_HEADER_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class PhotoInfo:
    """What the file name and header of one image say."""

    position: GeoPosition | None  # None when neither the name nor EXIF GPS gives one
    source: str  # "file name", "EXIF GPS" or "none"
    portrait: bool | None  # upright height > width; None when square or the header cannot be read


def exif_gps_degrees(exif: Image.Exif) -> tuple[float, float] | None:
    """(latitude, longitude) in degrees from EXIF GPS tags, or None when absent, malformed or (0, 0) (what cameras
    without a fix often write)."""
    gps = exif.get_ifd(GPS_IFD_TAG)
    if GPS_LATITUDE not in gps or GPS_LONGITUDE not in gps:
        return None
    try:
        latitude = _signed_degrees(gps[GPS_LATITUDE], gps.get(GPS_LATITUDE_REF, "N"), "S")
        longitude = _signed_degrees(gps[GPS_LONGITUDE], gps.get(GPS_LONGITUDE_REF, "E"), "W")
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not (abs(latitude) <= 90 and abs(longitude) <= 180) or (latitude, longitude) == (0.0, 0.0):
        return None
    return latitude, longitude


def _signed_degrees(degrees_minutes_seconds: Sequence, reference: str | bytes, negative_reference: str) -> float:
    """EXIF (degrees, minutes, seconds) rationals and 'N'/'S' (or 'E'/'W') -> signed decimal degrees."""
    degrees, minutes, seconds = (float(value) for value in degrees_minutes_seconds)
    if isinstance(reference, bytes):
        reference = reference.decode("ascii", errors="replace")
    value = degrees + minutes / 60 + seconds / 3600
    return -value if str(reference).strip().upper().startswith(negative_reference) else value


def read_photo_info(path: Path) -> PhotoInfo:
    """Coordinates and orientation of one image from its file name and header (pixels are not decoded). An
    unreadable header gives no EXIF coordinates; decoding the image later names the file."""
    from_name = position_from_vg_name(path.name)
    try:
        with Image.open(path) as image:
            exif = image.getexif()
            width, height = image.size
    except _HEADER_ERRORS as error:
        logger.debug("cannot read the header of %s: %s", path, error)
        exif, width, height = None, 0, 0
    if exif is not None and exif.get(ORIENTATION_TAG) in ROTATED_ORIENTATIONS:
        width, height = height, width
    portrait = None if width == height else height > width
    if from_name is not None:
        return PhotoInfo(from_name, "file name", portrait)
    degrees = exif_gps_degrees(exif) if exif is not None else None
    if degrees is not None:
        return PhotoInfo(position_from_gps(*degrees), "EXIF GPS", portrait)
    return PhotoInfo(None, "none", portrait)


def build_folder_split(
    database_folder: str | Path,
    queries_folder: str | Path,
    *,
    positive_dist_threshold: float = 25.0,
    exclude: Collection[str] | Mapping[str, str] = (),
    image_size: tuple[int, int] | None = None,
) -> PlaceIndex:
    """PlaceIndex of every image under database_folder and queries_folder (paths relative to their common folder),
    with positives within positive_dist_threshold when every image has coordinates (see the module docstring).

    exclude: see places.index.without_images; excluded images do not count when deciding on ground truth.
    image_size: the network's input (H, W); when given, a warning says so if most photos have the other orientation.
    """
    database_folder, queries_folder = _checked_folders(Path(database_folder), Path(queries_folder))
    root = Path(os.path.commonpath([database_folder, queries_folder]))
    index = PlaceIndex(
        name=FOLDERS_NAME,
        root=root,
        database_paths=_image_paths(database_folder, root, "database"),
        queries_paths=_image_paths(queries_folder, root, "queries"),
        database_utms=None,
        queries_utms=None,
        soft_positives_per_query=None,
    )
    index = without_images(index, exclude, None)
    infos = [read_photo_info(path) for path in index.absolute_paths()]
    _log_orientation(infos, image_size)
    if not _all_have_coordinates(index, infos):
        return index
    positions = [info.position for info in infos]
    try:
        frame = common_frame(positions, [str(path) for path in index.absolute_paths()], index.name)
    except ValueError as error:
        logger.warning("%s: no ground truth, so no recalls (predictions and pictures only)", error)
        return index
    database_frame, queries_frame = frame.split(index.database_num)
    positives = positives_within_radius(
        database_frame.coordinates, queries_frame.coordinates, positive_dist_threshold, algorithm=frame.search_algorithm
    )
    return dataclasses.replace(
        index,
        database_utms=utm_array(positions[: index.database_num]),
        queries_utms=utm_array(positions[index.database_num :]),
        soft_positives_per_query=positives,
        database_ecef=database_frame.ecef,
        queries_ecef=queries_frame.ecef,
    )


def _checked_folders(database_folder: Path, queries_folder: Path) -> tuple[Path, Path]:
    """Both folders, absolute; DatasetError when one is missing or one lies inside the other."""
    for what, folder in (("--database_folder", database_folder), ("--queries_folder", queries_folder)):
        if not folder.is_dir():
            raise DatasetError(f"{what} {folder}: folder not found")
    database_folder, queries_folder = database_folder.resolve(), queries_folder.resolve()
    if database_folder == queries_folder or database_folder in queries_folder.parents:
        raise DatasetError(
            f"--queries_folder {queries_folder} lies inside --database_folder {database_folder}: expected two "
            "separate folders (the queries would be found in the database)"
        )
    if queries_folder in database_folder.parents:
        raise DatasetError(
            f"--database_folder {database_folder} lies inside --queries_folder {queries_folder}: expected two "
            "separate folders"
        )
    return database_folder, queries_folder


def _image_paths(folder: Path, root: Path, what: str) -> list[str]:
    """Sorted posix paths, relative to root, of the images under folder (places.walk: symlinked folders are not
    followed, each image is listed once, what is left out is named); DatasetError when there is none."""
    listing = find_images(folder, IMAGE_SUFFIXES)
    listing.warn_about_skipped(folder)
    if not listing.images:
        raise DatasetError(
            f"no {what} images under {folder} (searched recursively for {', '.join(IMAGE_SUFFIXES)}, any case)"
        )
    prefix = folder.relative_to(root).as_posix()
    return [path if prefix == "." else f"{prefix}/{path}" for path in listing.images]


def _all_have_coordinates(index: PlaceIndex, infos: list[PhotoInfo]) -> bool:
    """Log where the coordinates came from; True when every image has them (warn when only some do)."""
    sources = {source: sum(info.source == source for info in infos) for source in ("file name", "EXIF GPS", "none")}
    missing = [path for path, info in zip(index.absolute_paths(), infos) if info.position is None]
    logger.info(
        "%s: coordinates from VG-format file names for %d images, from EXIF GPS for %d, none for %d",
        index.summary(),
        sources["file name"],
        sources["EXIF GPS"],
        sources["none"],
    )
    if not missing:
        return True
    if len(missing) == len(infos):
        logger.info("no image has coordinates: no ground truth, so no recalls (predictions and pictures only)")
    else:
        logger.warning(
            "%d of %d images have no coordinates (neither a VG-format file name nor EXIF GPS), e.g. %s: no ground "
            "truth, so no recalls (predictions and pictures only)",
            len(missing),
            len(infos),
            ", ".join(str(path) for path in missing[:3]),
        )
    return False


def _log_orientation(infos: list[PhotoInfo], image_size: tuple[int, int] | None) -> None:
    """Count portrait and landscape photos; warn when most have the other orientation than the network input."""
    portrait = sum(info.portrait is True for info in infos)
    landscape = sum(info.portrait is False for info in infos)
    logger.info(
        "%d landscape, %d portrait and %d square or unreadable images",
        landscape,
        portrait,
        len(infos) - portrait - landscape,
    )
    if image_size is None or image_size[0] == image_size[1]:
        return
    height, width = image_size
    other = portrait if height < width else landscape
    if other > len(infos) / 2:
        logger.warning(
            "%d of %d images are %s but the network input is %dx%d (HxW): every image is resized to it, so they are "
            "squashed. Pass --resize %d %d to feed them upright (the reranker takes it: the same region count)",
            other,
            len(infos),
            "portrait" if height < width else "landscape",
            height,
            width,
            width,
            height,
        )
