"""Mapillary Street-Level Sequences (MSLS), read natively from its CSV files (no mapillary_sls package).

Layout: <datasets_folder>/msls/{train_val,test}/<city>/{query,database}/ with images/<key>.jpg, seq_info.csv,
subtask_index.csv, and for train_val also postprocessed.csv (UTM easting/northing) and raw.csv (pano flag).

Splits, as in mapillary_sls (task im2im): val = cph + sf, subtask "all", panoramas dropped, queries with a database
image within 25 m of the same city (the official ~740-query protocol); train = the 22 training cities, panoramas
dropped, no subtask filter, hard positives within 10 m (queries without one dropped) and soft positives within
25 m; test = the 6 challenge cities, subtask "all", no ground truth.

Built indexes are cached (docs/msls_cache.md). The official mAP@k and the challenge submission file are in
places/msls_protocol.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import zipfile
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from places.index import (
    DatasetError,
    PlaceIndex,
    drop_queries_without_positives,
    positives_within_radius,
    without_images,
)
from schema import Field, FileFormatError, check_fields
from util import atomic_write

logger = logging.getLogger(__name__)

MSLS_CITIES: dict[str, tuple[str, ...]] = {
    "train": (
        "trondheim",
        "london",
        "boston",
        "melbourne",
        "amsterdam",
        "helsinki",
        "tokyo",
        "toronto",
        "saopaulo",
        "moscow",
        "zurich",
        "paris",
        "bangkok",
        "budapest",
        "austin",
        "berlin",
        "ottawa",
        "phoenix",
        "goa",
        "amman",
        "nairobi",
        "manila",
    ),
    "val": ("cph", "sf"),
    "test": ("miami", "athens", "buenosaires", "stockholm", "bengaluru", "kampala"),
}
MSLS_SUBTASKS = ("all", "s2w", "w2s", "o2n", "n2o", "d2n", "n2d")
MSLS_SIDES = ("query", "database")
MSLS_LAYOUT = (
    "<datasets_folder>/msls/{train_val,test}/<city>/{query,database}/ holding images/<key>.jpg, "
    "seq_info.csv, subtask_index.csv, and for train_val also postprocessed.csv and raw.csv"
)
CACHE_FORMAT_VERSION = 2  # 2: positives by brute force, cities without queries left out (as mapillary_sls)
CACHE_FOLDER_NAME = "prgs_index"
# the cache file's arrays (_encode_index), checked before an index is built from them: C cities, Nd database images,
# Nq queries; the positives are flattened database indices with Nq + 1 offsets into them
CACHE_VERSION_FIELDS = {"format_version": Field("iu"), "fingerprint": Field("U")}
CACHE_FIELDS = {
    "cities": Field("U", ("C",)),
    "summary": Field("U"),
    "database_keys": Field("S", ("Nd",)),
    "queries_keys": Field("S", ("Nq",)),
    "database_city": Field("iu", ("Nd",), minimum=0, below="C"),
    "queries_city": Field("iu", ("Nq",), minimum=0, below="C"),
    "database_utms": Field("f", ("Nd", 2), required=False),
    "queries_utms": Field("f", ("Nq", 2), required=False),
}
CACHE_POSITIVES_FIELDS = {
    f"{kind}_positives_{part}": field
    for kind in ("soft", "hard")
    for part, field in (
        ("flat", Field("iu", (None,), minimum=0, below="Nd", required=False)),
        ("offsets", Field("iu", ("Nq+1",), minimum=0, required=False)),
    )
}


def msls_city_subdir(city: str) -> str:
    """'test' for the challenge cities, 'train_val' for every other city."""
    return "test" if city in MSLS_CITIES["test"] else "train_val"


# ----------------------------------------------------------------------------------------------------------------
# Building a split
# ----------------------------------------------------------------------------------------------------------------


def build_msls_split(
    datasets_folder: str | Path,
    split: str,
    *,
    positive_dist_threshold: float = 25.0,
    train_positive_dist_threshold: float = 10.0,
    cities: Sequence[str] | None = None,
    subtask: str = "all",
    exclude: Collection[str] | Mapping[str, str] = (),
    cache_dir: str | Path | None = None,
) -> PlaceIndex:
    """PlaceIndex of MSLS split "train", "val" or "test", loaded from the cache when the CSVs are unchanged.

    cities: default all cities of the split (every one must be present); give a subset explicitly otherwise.
    subtask: the subtask_index.csv column kept for val and test ("all" is the official protocol).
    exclude: images to leave out (see places.index.without_images); val/train queries left without a positive are
    dropped. cache_dir: default <datasets_folder>/msls/prgs_index, or a user cache folder if that is not writable.
    Image paths are relative to <datasets_folder>/msls, so the dataset (with its cache) can be moved.
    """
    msls_root = _msls_root(Path(datasets_folder))
    cities = _checked_cities(msls_root, split, cities)
    if subtask not in MSLS_SUBTASKS:
        raise DatasetError(f"unknown MSLS subtask '{subtask}', expected one of {list(MSLS_SUBTASKS)}")
    if split == "train" and subtask != "all":
        raise DatasetError(f"MSLS train applies no subtask filter; got subtask '{subtask}', expected 'all'")
    csv_contents = {path: path.read_bytes() for path in _csv_paths(msls_root, split, cities)}
    settings = dict(
        format_version=CACHE_FORMAT_VERSION,
        split=split,
        cities=list(cities),
        subtask=subtask,
        positive_dist_threshold=float(positive_dist_threshold),
        train_positive_dist_threshold=float(train_positive_dist_threshold),
    )
    fingerprint = _fingerprint(msls_root, csv_contents, settings)
    name = _split_name(split, cities, subtask)
    cache_file_name = _cache_file_name(split, cities, subtask)
    cache_folders = _cache_folders(msls_root, cache_dir)

    index = _load_cached_index(cache_folders, cache_file_name, fingerprint, msls_root, name)
    if index is None:
        index = _build_index(
            msls_root,
            split,
            cities,
            subtask,
            csv_contents,
            name,
            positive_dist_threshold,
            train_positive_dist_threshold,
        )
        _save_cached_index(index, cities, fingerprint, cache_folders, cache_file_name)
    return without_images(index, exclude, {"val": "soft", "train": "hard", "test": None}[split])


def _msls_root(datasets_folder: Path) -> Path:
    """<datasets_folder>/msls, checked to exist."""
    msls_root = datasets_folder / "msls"
    if not msls_root.is_dir():
        raise DatasetError(f"MSLS folder {msls_root} not found; expected the layout {MSLS_LAYOUT}")
    return msls_root


def _checked_cities(msls_root: Path, split: str, cities: Sequence[str] | None) -> list[str]:
    """The cities of the split (default: all of them), each checked to have its folder."""
    if split not in MSLS_CITIES:
        raise DatasetError(f"unknown MSLS split '{split}', expected one of {list(MSLS_CITIES)}")
    if cities is None:
        cities = MSLS_CITIES[split]
    cities = list(cities)
    if not cities or len(set(cities)) != len(cities):
        raise DatasetError(f"MSLS cities must be a non-empty list without repeats, got {cities}")
    for city in cities:
        city_folder = msls_root / msls_city_subdir(city) / city
        if not city_folder.is_dir():
            present = sorted(p.name for p in (msls_root / msls_city_subdir(city)).glob("*") if p.is_dir())
            raise DatasetError(
                f"MSLS city '{city}' of split '{split}' not found: no folder {city_folder} (cities "
                f"present there: {present or 'none'}); download it, or pass the cities you have "
                f"with cities="
            )
    return cities


def _csv_paths(msls_root: Path, split: str, cities: Sequence[str]) -> list[Path]:
    """Every CSV the split reads, in a fixed order, checked to exist (with each side's images/ folder)."""
    file_names = ["seq_info.csv"]
    if split != "train":
        file_names.append("subtask_index.csv")
    if split != "test":
        file_names += ["postprocessed.csv", "raw.csv"]
    paths = []
    for city in cities:
        for side in MSLS_SIDES:
            side_folder = msls_root / msls_city_subdir(city) / city / side
            for required in ["images"] + file_names:
                if not (side_folder / required).exists():
                    raise DatasetError(f"MSLS {split}: {side_folder / required} not found; expected {MSLS_LAYOUT}")
            paths += [side_folder / file_name for file_name in file_names]
    return paths


def _split_name(split: str, cities: Sequence[str], subtask: str) -> str:
    """'msls/val' for the official split, with the cities and subtask when they differ from it."""
    name = f"msls/{split}"
    if list(cities) != list(MSLS_CITIES[split]):
        name += "-" + "+".join(cities)
    if subtask != "all":
        name += f"-{subtask}"
    return name


@dataclass
class SideImages:
    """The images kept on one side (query or database) of one city, in CSV order."""

    keys: list[str]
    utms: np.ndarray | None  # (N, 2) easting, northing; None for test cities
    night: np.ndarray | None  # (N,) bool, when postprocessed.csv has the column
    sideways: np.ndarray | None  # (N,) bool: view_direction == 'Sideways'


def _build_index(
    msls_root: Path,
    split: str,
    cities: Sequence[str],
    subtask: str,
    csv_contents: Mapping[Path, bytes],
    name: str,
    positive_dist_threshold: float,
    train_positive_dist_threshold: float,
) -> PlaceIndex:
    """PlaceIndex of the split from the CSV contents, with positives per city and the protocol's query filter."""
    logger.info("building the %s index from the CSV files under %s", name, msls_root)
    sides = {side: _read_sides(msls_root, split, cities, subtask, csv_contents, side) for side in MSLS_SIDES}
    if split != "test":
        sides = _without_empty_cities(sides, name)
    database_paths, database_keys, database_groups = _paths_keys_groups(sides["database"], "database")
    queries_paths, queries_keys, queries_groups = _paths_keys_groups(sides["query"], "query")
    common = dict(
        name=name,
        root=msls_root,
        database_paths=database_paths,
        queries_paths=queries_paths,
        database_keys=database_keys,
        queries_keys=queries_keys,
        database_groups=database_groups,
        queries_groups=queries_groups,
    )
    if split == "test":
        return PlaceIndex(database_utms=None, queries_utms=None, soft_positives_per_query=None, **common)

    database_utms = np.concatenate([images.utms for _, images in sides["database"]])
    queries_utms = np.concatenate([images.utms for _, images in sides["query"]])
    queries_attributes = {}
    for attribute in ("night", "sideways"):
        values = [getattr(images, attribute) for _, images in sides["query"]]
        if all(v is not None for v in values):
            queries_attributes[attribute] = np.concatenate(values)
    soft_positives = positives_within_radius(
        database_utms, queries_utms, positive_dist_threshold, database_groups, queries_groups, algorithm="brute"
    )
    hard_positives = None
    if split == "train":
        hard_positives = positives_within_radius(
            database_utms,
            queries_utms,
            train_positive_dist_threshold,
            database_groups,
            queries_groups,
            algorithm="brute",
        )
    index = PlaceIndex(
        database_utms=database_utms,
        queries_utms=queries_utms,
        soft_positives_per_query=soft_positives,
        hard_positives_per_query=hard_positives,
        queries_attributes=queries_attributes,
        **common,
    )
    kind, radius = ("soft", positive_dist_threshold) if split == "val" else ("hard", train_positive_dist_threshold)
    return drop_queries_without_positives(index, kind, f"no database image of the same city within {radius:g} m")


def _read_sides(
    msls_root: Path, split: str, cities: Sequence[str], subtask: str, csv_contents: Mapping[Path, bytes], side: str
) -> list[tuple[str, SideImages]]:
    """(city, the images kept on this side of it) for every city of the split."""
    return [
        (
            city,
            _read_side(
                msls_root / msls_city_subdir(city) / city / side,
                csv_contents,
                with_geo=split != "test",
                subtask=None if split == "train" else subtask,
            ),
        )
        for city in cities
    ]


def _without_empty_cities(
    sides: dict[str, list[tuple[str, SideImages]]], name: str
) -> dict[str, list[tuple[str, SideImages]]]:
    """The cities that keep at least one query and one database image after the filters (subtask, panoramas); as
    in mapillary_sls, a city left without one side contributes neither (its database images are not distractors)."""
    kept = [
        city
        for (city, queries), (_, database) in zip(sides["query"], sides["database"])
        if len(queries.keys) and len(database.keys)
    ]
    for (city, queries), (_, database) in zip(sides["query"], sides["database"]):
        if city not in kept:
            logger.info(
                "%s: city %s keeps %d queries and %d database images after the filters: left out entirely, as in "
                "mapillary_sls",
                name,
                city,
                len(queries.keys),
                len(database.keys),
            )
    return {side: [(city, images) for city, images in sides[side] if city in kept] for side in MSLS_SIDES}


def _paths_keys_groups(
    city_images: Sequence[tuple[str, SideImages]], side: str
) -> tuple[list[str], list[str], list[str]]:
    """Image paths relative to the msls root, keys and cities of one side, cities in order."""
    paths, keys, groups = [], [], []
    for city, images in city_images:
        logger.debug("%s %s: %d images kept", city, side, len(images.keys))
        folder = f"{msls_city_subdir(city)}/{city}/{side}/images"
        paths += [f"{folder}/{key}.jpg" for key in images.keys]
        keys += images.keys
        groups += [city] * len(images.keys)
    return paths, keys, groups


# ----------------------------------------------------------------------------------------------------------------
# Reading the CSV files
# ----------------------------------------------------------------------------------------------------------------


def _read_side(
    side_folder: Path, csv_contents: Mapping[Path, bytes], with_geo: bool, subtask: str | None
) -> SideImages:
    """The images of one city side kept by the filters: subtask column true (if subtask), not a panorama (if
    with_geo, which also reads the UTM). Keys and their order come from seq_info.csv, as in mapillary_sls."""
    seq_info_path = side_folder / "seq_info.csv"
    keys = _parse_csv(seq_info_path, csv_contents[seq_info_path], ["key"])["key"]
    duplicates = sorted(key for key, count in Counter(keys).items() if count > 1)
    if duplicates:
        raise DatasetError(f"{seq_info_path}: image keys must be unique, found repeated keys {duplicates[:5]}")
    keep = np.ones(len(keys), dtype=bool)
    if subtask is not None:
        path = side_folder / "subtask_index.csv"
        table = _aligned_to_keys(path, _parse_csv(path, csv_contents[path], [subtask]), keys)
        keep &= _booleans(path, table, subtask)
    if not with_geo:
        return SideImages(keys=[k for k, kept in zip(keys, keep) if kept], utms=None, night=None, sideways=None)

    raw_path = side_folder / "raw.csv"
    raw = _aligned_to_keys(raw_path, _parse_csv(raw_path, csv_contents[raw_path], ["key", "pano"]), keys)
    keep &= ~_booleans(raw_path, raw, "pano")
    post_path = side_folder / "postprocessed.csv"
    post = _aligned_to_keys(
        post_path, _parse_csv(post_path, csv_contents[post_path], ["key", "easting", "northing"]), keys
    )
    utms = np.stack([_floats(post_path, post, "easting"), _floats(post_path, post, "northing")], axis=1)
    night = _booleans(post_path, post, "night")[keep] if "night" in post else None
    sideways = (np.array(post["view_direction"]) == "Sideways")[keep] if "view_direction" in post else None
    return SideImages(keys=[k for k, kept in zip(keys, keep) if kept], utms=utms[keep], night=night, sideways=sideways)


def _parse_csv(path: Path, content: bytes, required_columns: Sequence[str]) -> dict[str, list[str]]:
    """Columns of a CSV file (header row first) as {column name: values}; the unnamed index column is ''."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} is not UTF-8 text: {error}") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise DatasetError(f"{path} is empty; expected a header row with the columns {list(required_columns)}")
    header, body = rows[0], [row for row in rows[1:] if row]
    missing = [c for c in required_columns if c not in header]
    if missing:
        raise DatasetError(
            f"{path} has no column {missing}: found columns {header}, expected at least {list(required_columns)}"
        )
    for line_number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DatasetError(
                f"{path} line {line_number}: {len(row)} fields, expected {len(header)} as in the header {header}"
            )
    return {column: [row[i] for row in body] for i, column in enumerate(header)}


def _aligned_to_keys(path: Path, table: dict[str, list[str]], keys: Sequence[str]) -> dict[str, list[str]]:
    """table with its rows reordered to follow keys: matched by the 'key' column when the file has one, else row by
    row (same row count required)."""
    row_count = len(next(iter(table.values()))) if table else 0
    if row_count != len(keys):
        raise DatasetError(f"{path} has {row_count} rows, expected {len(keys)} as in seq_info.csv of the same folder")
    if "key" not in table:
        return table
    row_of_key = {key: row for row, key in enumerate(table["key"])}
    missing = [key for key in keys if key not in row_of_key]
    if missing:
        raise DatasetError(f"{path}: {len(missing)} keys of seq_info.csv are missing, e.g. {missing[:3]}")
    order = [row_of_key[key] for key in keys]
    return {column: [values[row] for row in order] for column, values in table.items()}


_TRUE_VALUES = {"true": True, "1": True, "false": False, "0": False}


def _booleans(path: Path, table: dict[str, list[str]], column: str) -> np.ndarray:
    """A 'True'/'False' column (as written by pandas; also 'true', '1', '0') as a bool array."""
    values = []
    for row, value in enumerate(table[column]):
        parsed = _TRUE_VALUES.get(value.strip().lower())
        if parsed is None:
            raise DatasetError(
                f"{path} data row {row + 1}, column '{column}': '{value}' is not a boolean, expected 'True' or 'False'"
            )
        values.append(parsed)
    return np.array(values, dtype=bool)


def _floats(path: Path, table: dict[str, list[str]], column: str) -> np.ndarray:
    """A numeric column as a finite float64 array."""
    try:
        values = np.array([float(v) for v in table[column]], dtype=np.float64)
    except ValueError as error:
        raise DatasetError(f"{path}, column '{column}': {error}; expected numbers (UTM metres)") from None
    if not np.isfinite(values).all():
        row = int(np.flatnonzero(~np.isfinite(values))[0])
        raise DatasetError(
            f"{path} data row {row + 1}, column '{column}': '{table[column][row]}' is not a finite number"
        )
    return values


# ----------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------


def _fingerprint(msls_root: Path, csv_contents: Mapping[Path, bytes], settings: Mapping) -> str:
    """sha1 of the settings and of every CSV's relative path and content."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    for path in sorted(csv_contents):
        digest.update(path.relative_to(msls_root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha1(csv_contents[path]).digest())
    return digest.hexdigest()


def _cache_file_name(split: str, cities: Sequence[str], subtask: str) -> str:
    """msls_<split>.npz for the official split, with a short hash of the cities and subtask otherwise."""
    if list(cities) == list(MSLS_CITIES[split]) and subtask == "all":
        return f"msls_{split}.npz"
    variant = hashlib.sha1(json.dumps([list(cities), subtask]).encode()).hexdigest()[:10]
    return f"msls_{split}_{variant}.npz"


def user_cache_folder() -> Path:
    """$XDG_CACHE_HOME/prgs/msls_index (default ~/.cache/prgs/msls_index): where caches go when the dataset's own
    cache folder is not writable."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prgs" / "msls_index"


def _cache_folders(msls_root: Path, cache_dir: str | Path | None) -> list[Path]:
    """Where to look for and write the cache, in order of preference."""
    primary = Path(cache_dir) if cache_dir is not None else msls_root / CACHE_FOLDER_NAME
    fallback = user_cache_folder()
    return [primary] if primary == fallback else [primary, fallback]


def _load_cached_index(
    cache_folders: Sequence[Path], file_name: str, fingerprint: str, msls_root: Path, name: str
) -> PlaceIndex | None:
    """The cached index with this fingerprint from the first folder that has it, or None (logging why)."""
    for folder in cache_folders:
        path = folder / file_name
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as loaded:
                arrays = {key: loaded[key] for key in loaded.files}
            check_fields(path, arrays, CACHE_VERSION_FIELDS)
            if int(arrays["format_version"]) != CACHE_FORMAT_VERSION or str(arrays["fingerprint"]) != fingerprint:
                logger.info(
                    "MSLS cache %s is stale (the CSV files, the settings or the cache format changed); rebuilding",
                    path,
                )
                continue
            _check_cache_arrays(path, arrays)
            index = _decode_index(arrays, msls_root, name)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as error:
            logger.warning("MSLS cache %s is unreadable (%s: %s); rebuilding", path, type(error).__name__, error)
            continue
        logger.info("loaded %s from the cache %s", index.summary(), path)
        return index
    return None


def _check_cache_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """FileFormatError naming the field when the cache's arrays do not make an index: a wrong dtype or length, a city
    code or a positive's database index out of range, offsets that do not partition the positives."""
    lengths = check_fields(path, arrays, CACHE_FIELDS)
    check_fields(path, arrays, CACHE_POSITIVES_FIELDS, known_lengths={**lengths, "Nq+1": lengths["Nq"] + 1})
    for kind in ("soft", "hard"):
        flat, offsets = arrays.get(f"{kind}_positives_flat"), arrays.get(f"{kind}_positives_offsets")
        if (flat is None) != (offsets is None):
            raise FileFormatError(f"{path}: {kind} positives need both fields, '_flat' and '_offsets'")
        if offsets is None:
            continue
        decreases = bool(np.any(np.diff(offsets) < 0))
        if offsets[0] != 0 or offsets[-1] != len(flat) or decreases:
            raise FileFormatError(
                f"{path}: field '{kind}_positives_offsets' must rise from 0 to {len(flat)} (the positives' count), "
                f"got {offsets[0]} .. {offsets[-1]}{' and a decrease' if decreases else ''}"
            )


def _save_cached_index(
    index: PlaceIndex, cities: Sequence[str], fingerprint: str, cache_folders: Sequence[Path], file_name: str
) -> None:
    """Write the index atomically (temporary file + os.replace) to the first writable cache folder."""
    arrays = _encode_index(index, cities, fingerprint)
    for attempt, folder in enumerate(cache_folders):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / file_name, lambda f: np.savez(f, **arrays))
        except OSError as error:
            logger.warning(
                "cannot write the MSLS cache to %s (%s)%s",
                folder,
                error,
                "; trying the next cache folder"
                if attempt + 1 < len(cache_folders)
                else "; continuing without a cache",
            )
            continue
        logger.info("saved the %s index to the cache %s", index.name, folder / file_name)
        return


def _encode_index(index: PlaceIndex, cities: Sequence[str], fingerprint: str) -> dict[str, np.ndarray]:
    """Arrays for np.savez (no pickles): keys, city codes, UTMs, flattened positives, query attributes."""
    city_code = {city: code for code, city in enumerate(cities)}
    arrays = {
        "format_version": np.array(CACHE_FORMAT_VERSION),
        "fingerprint": np.array(fingerprint),
        "cities": np.array(list(cities)),
        "summary": np.array(
            json.dumps({"name": index.name, "database": index.database_num, "queries": index.queries_num})
        ),
    }
    for side, keys, groups, utms in (
        ("database", index.database_keys, index.database_groups, index.database_utms),
        ("queries", index.queries_keys, index.queries_groups, index.queries_utms),
    ):
        arrays[f"{side}_keys"] = np.array([k.encode() for k in keys], dtype=np.bytes_).reshape(-1)
        arrays[f"{side}_city"] = np.array([city_code[g] for g in groups], dtype=np.int16)
        if utms is not None:
            arrays[f"{side}_utms"] = utms
    for kind in ("soft", "hard"):
        positives = getattr(index, f"{kind}_positives_per_query")
        if positives is not None:
            lengths = np.array([len(p) for p in positives], dtype=np.int64)
            arrays[f"{kind}_positives_flat"] = (np.concatenate(positives) if positives else np.empty(0)).astype(
                np.int32
            )
            arrays[f"{kind}_positives_offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    for attribute, values in index.queries_attributes.items():
        arrays[f"queries_attribute_{attribute}"] = values
    return arrays


def _decode_index(arrays: Mapping[str, np.ndarray], msls_root: Path, name: str) -> PlaceIndex:
    """PlaceIndex from the arrays written by _encode_index, paths rebuilt under msls_root."""
    cities = [str(c) for c in arrays["cities"]]

    def side(prefix: str, side_folder: str) -> tuple[list[str], list[str], list[str]]:
        keys = [k.decode() for k in arrays[f"{prefix}_keys"].tolist()]
        groups = [cities[c] for c in arrays[f"{prefix}_city"].tolist()]
        paths = [f"{msls_city_subdir(g)}/{g}/{side_folder}/images/{k}.jpg" for k, g in zip(keys, groups)]
        return paths, keys, groups

    def positives(kind: str) -> list[np.ndarray] | None:
        if f"{kind}_positives_flat" not in arrays:
            return None
        flat = arrays[f"{kind}_positives_flat"].astype(np.int64)
        offsets = arrays[f"{kind}_positives_offsets"]
        return [flat[offsets[q] : offsets[q + 1]] for q in range(len(offsets) - 1)]

    database_paths, database_keys, database_groups = side("database", "database")
    queries_paths, queries_keys, queries_groups = side("queries", "query")
    attribute_prefix = "queries_attribute_"
    return PlaceIndex(
        name=name,
        root=msls_root,
        database_paths=database_paths,
        queries_paths=queries_paths,
        database_utms=arrays.get("database_utms"),
        queries_utms=arrays.get("queries_utms"),
        soft_positives_per_query=positives("soft"),
        hard_positives_per_query=positives("hard"),
        database_keys=database_keys,
        queries_keys=queries_keys,
        database_groups=database_groups,
        queries_groups=queries_groups,
        queries_attributes={k[len(attribute_prefix) :]: arrays[k] for k in arrays if k.startswith(attribute_prefix)},
    )
