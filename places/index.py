"""The place index: one split of a dataset as database images then queries in one index space
[database 0..Nd-1, queries Nd..Nd+Nq-1], with ground-truth positives by radius, and the coordinates in VG-format
file names. The leaf of the dataset code: every reader (VG folders, MSLS, the toy world, plain folders) builds one."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.neighbors import NearestNeighbors

from util import PRGSError

logger = logging.getLogger(__name__)


class DatasetError(PRGSError, ValueError):
    """A dataset that does not have the expected layout or content; the message names the path, the value found
    and what was expected."""


@dataclass(repr=False, eq=False)
class PlaceIndex:
    """One split of one dataset: database images then queries, one index space [database..., queries...].

    Positives are database indices (0..Nd-1), one int64 array per query, sorted by distance (ties by index).
    """

    name: str  # e.g. "pitts30k/test", "msls/val", "toy_world/train"
    root: Path  # folder the image paths are relative to (made absolute)
    database_paths: list[str]  # relative to root, posix separators
    queries_paths: list[str]
    # (Nd, 2) float64 UTM (east, north) metres, each image in its own zone (NaN outside UTM's latitudes); None when
    # unknown (MSLS test)
    database_utms: np.ndarray | None
    queries_utms: np.ndarray | None  # (Nq, 2)
    soft_positives_per_query: list[np.ndarray] | None  # within positive_dist_threshold (25 m); None: no ground truth
    hard_positives_per_query: list[np.ndarray] | None = None  # train only: within 10 m
    database_keys: list[str] = field(default_factory=list)  # image keys (file stems); filled from paths when empty
    queries_keys: list[str] = field(default_factory=list)
    database_groups: list[str] | None = None  # e.g. the MSLS city; positives never cross groups
    queries_groups: list[str] | None = None
    queries_attributes: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. MSLS "night", "sideways" (Nq,)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason) left out of this split
    # (Nd, 3) / (Nq, 3) WGS84 earth-centred metres where positives were measured in that frame (places.geodesy: zones
    # mixed, EXIF GPS); None when they were measured in planar UTM (VG names in one zone) or there is no ground truth
    database_ecef: np.ndarray | None = None
    queries_ecef: np.ndarray | None = None

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
        coordinate_fields = (
            ("database_utms", 2, self.database_num),
            ("queries_utms", 2, self.queries_num),
            ("database_ecef", 3, self.database_num),
            ("queries_ecef", 3, self.queries_num),
        )
        for field_name, columns, num in coordinate_fields:
            coordinates = getattr(self, field_name)
            if coordinates is not None:
                per_image[field_name] = (len(coordinates), num)
                if coordinates.ndim != 2 or coordinates.shape[1] != columns:
                    raise ValueError(f"{self.name}: {field_name} must be (N, {columns}), got {coordinates.shape}")
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
# Coordinates in VG-format file names (VG folders and plain folders of photos read them)
# ----------------------------------------------------------------------------------------------------------------

VG_FILE_NAME_PATTERN = "@UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@lat@lon@...@.jpg"
UTM_BAND_LETTERS = "CDEFGHJKLMNPQRSTUVWX"  # latitude bands 80 S to 84 N; N and later are northern


def utm_from_filename(path: str | Path) -> tuple[float, float]:
    """(UTM east, UTM north) in metres from a VG-format file name '@east@north@...@.jpg'.

    Only the base name is parsed, so an '@' in a parent folder does not matter.
    """
    name = Path(path).name
    fields = name.split("@")
    if len(fields) < 3:
        raise DatasetError(
            f"cannot read UTM coordinates from file name {path}: expected the pattern "
            f"'{VG_FILE_NAME_PATTERN}', found {len(fields) - 1} '@' in '{name}'"
        )
    try:
        east, north = float(fields[1]), float(fields[2])
    except ValueError:
        raise DatasetError(
            f"cannot read UTM coordinates from file name {path}: expected numbers in the first two "
            f"fields of '{VG_FILE_NAME_PATTERN}', found '{fields[1]}' and '{fields[2]}'"
        ) from None
    if not (np.isfinite(east) and np.isfinite(north)):
        raise DatasetError(f"UTM coordinates in file name {path} are not finite: east={east}, north={north}")
    return east, north


def vg_name_coordinates(name: str) -> tuple[float, float, str | None] | None:
    """(east, north, zone) from a VG-format file name '@east@north@zone@letter@...', or None for any other name.

    zone is e.g. "17N" (zone number and hemisphere from the latitude band letter), None when those fields are absent
    or are not a UTM zone number (1 to 60) and band letter (C to X).
    """
    fields = name.split("@")
    if len(fields) < 3 or fields[0] != "":
        return None
    try:
        east, north = float(fields[1]), float(fields[2])
    except ValueError:
        return None
    if not (np.isfinite(east) and np.isfinite(north)):
        return None
    zone = None
    if len(fields) > 5 and fields[3].isdigit() and len(fields[4]) == 1 and fields[4].isalpha():
        zone_number, letter = int(fields[3]), fields[4].upper()
        if 1 <= zone_number <= 60 and letter in UTM_BAND_LETTERS:
            zone = f"{zone_number}{'N' if letter >= 'N' else 'S'}"
    return east, north, zone


def vg_name_lat_lon(name: str) -> tuple[float, float] | None:
    """(latitude, longitude) in degrees from the fields after the zone of a VG-format file name
    '@east@north@zone@letter@lat@lon@...', or None when absent, not numbers, out of range or (0, 0)."""
    fields = name.split("@")
    if len(fields) < 8 or fields[0] != "":
        return None
    try:
        latitude, longitude = float(fields[5]), float(fields[6])
    except ValueError:
        return None
    if not (abs(latitude) <= 90 and abs(longitude) <= 180) or (latitude, longitude) == (0.0, 0.0):
        return None
    return latitude, longitude


# ----------------------------------------------------------------------------------------------------------------
# Positives
# ----------------------------------------------------------------------------------------------------------------


def positives_within_radius(
    database_utms: np.ndarray,
    queries_utms: np.ndarray,
    radius_m: float,
    database_groups: Sequence[str] | None = None,
    queries_groups: Sequence[str] | None = None,
    algorithm: str = "auto",
) -> list[np.ndarray]:
    """For each query, the database indices within radius_m metres (inclusive), sorted by distance then index.

    Coordinates: (N, 2) planar UTM or (N, 3) earth-centred metres, both sides in one frame (places.geodesy chooses
    it). With groups (e.g. the MSLS city), a query is compared only with database images of its own group, since UTM
    coordinates of different cities or zones are not comparable. Returns one int64 array per query.

    algorithm: sklearn NearestNeighbors' search. The boundary depends on it: 'auto' (a kd-tree in 2-D, what the VG
    benchmark uses) computes exact distances, while 'brute' (what mapillary_sls uses) computes them from dot
    products, which at UTM magnitudes moves a database image near the radius in or out by ~1e-4 m. Each dataset
    uses its reference's choice, so its positives are the reference's; in earth-centred coordinates the VG and folder
    readers take a kd-tree (places.geodesy.Frame.search_algorithm).
    """
    database_utms = _checked_coordinates(database_utms, "database_utms")
    queries_utms = _checked_coordinates(queries_utms, "queries_utms")
    if database_utms.shape[1] != queries_utms.shape[1]:
        raise ValueError(
            f"database and queries coordinates must be in one frame, got {database_utms.shape[1]} and "
            f"{queries_utms.shape[1]} columns"
        )
    if (database_groups is None) != (queries_groups is None):
        raise ValueError("give groups for both database and queries, or for neither")
    if database_groups is None:
        database_group_of = np.zeros(len(database_utms), dtype=np.int64)
        queries_group_of = np.zeros(len(queries_utms), dtype=np.int64)
    else:
        database_group_of, queries_group_of = np.asarray(database_groups), np.asarray(queries_groups)
        if len(database_group_of) != len(database_utms) or len(queries_group_of) != len(queries_utms):
            raise ValueError(
                f"groups must have one entry per image: {len(database_group_of)} database groups for "
                f"{len(database_utms)} images, {len(queries_group_of)} query groups for "
                f"{len(queries_utms)} images"
            )
    positives = [np.empty(0, dtype=np.int64) for _ in range(len(queries_utms))]
    for group in np.unique(queries_group_of):
        group_queries = np.flatnonzero(queries_group_of == group)
        group_database = np.flatnonzero(database_group_of == group)
        if len(group_database) == 0:
            continue
        knn = NearestNeighbors(algorithm=algorithm).fit(database_utms[group_database])
        distances, neighbours = knn.radius_neighbors(queries_utms[group_queries], radius=radius_m)
        for query, query_distances, query_neighbours in zip(group_queries, distances, neighbours):
            order = np.lexsort((query_neighbours, query_distances))
            positives[query] = group_database[query_neighbours[order]].astype(np.int64)
    return positives


def _checked_coordinates(coordinates: np.ndarray, what: str) -> np.ndarray:
    """coordinates as a finite (N, 2) or (N, 3) float64 array, or ValueError."""
    coordinates = np.asarray(coordinates, dtype=np.float64)
    if coordinates.ndim != 2 or coordinates.shape[1] not in (2, 3):
        raise ValueError(f"{what} must have shape (N, 2) or (N, 3), got {coordinates.shape}")
    if not np.isfinite(coordinates).all():
        not_finite = int((~np.isfinite(coordinates)).any(axis=1).sum())
        raise ValueError(f"{what} has {not_finite} rows that are not finite")
    return coordinates


# ----------------------------------------------------------------------------------------------------------------
# Subsets: leaving images out, dropping queries
# ----------------------------------------------------------------------------------------------------------------


def subset_index(
    index: PlaceIndex, database_kept: np.ndarray, queries_kept: np.ndarray, excluded: Sequence[tuple[str, str]] = ()
) -> PlaceIndex:
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
        name=index.name,
        root=index.root,
        database_paths=take(index.database_paths, database_kept),
        queries_paths=take(index.queries_paths, queries_kept),
        database_utms=take(index.database_utms, database_kept),
        queries_utms=take(index.queries_utms, queries_kept),
        database_ecef=take(index.database_ecef, database_kept),
        queries_ecef=take(index.queries_ecef, queries_kept),
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
    logger.info(
        "%s: dropped %d of %d queries without a %s positive%s",
        index.name,
        dropped,
        index.queries_num,
        kind,
        f" ({why})" if why else "",
    )
    return subset_index(index, np.arange(index.database_num), queries_kept)


def without_images(
    index: PlaceIndex, exclude: Collection[str] | Mapping[str, str], require_positives: str | None
) -> PlaceIndex:
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
        raise TypeError(
            f"exclude must be a collection of paths or a mapping path -> reason, got the single path {exclude!r}"
        )
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
        raise DatasetError(
            f"{index.name}: {len(unknown)} paths to exclude are not images of this split (root {index.root}): {shown}"
        )
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
