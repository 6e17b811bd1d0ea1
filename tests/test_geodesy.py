"""Ground-truth distances anywhere on the Earth (places.geodesy): positives match the WGS84 geodesic across UTM zone
boundaries, the equator, the antimeridian and near the poles; VG names keep their zone and latitude and longitude;
splits that mix zones, or EXIF GPS and VG names, are compared in one frame, in dataset and in folder mode."""

import logging
from pathlib import Path

import numpy as np
import pytest
import utm
from geographiclib.geodesic import Geodesic
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

from places.folders import build_folder_split
from places.geodesy import (
    ECEF,
    PLANAR_UTM,
    WGS84_FLATTENING,
    WGS84_SEMI_MAJOR_AXIS_M,
    GeoPosition,
    common_frame,
    ecef_from_lat_lon,
    position_from_gps,
    position_from_vg_name,
)
from places.index import DatasetError, positives_within_radius, vg_name_coordinates, vg_name_lat_lon
from places.vg import build_vg_split

# Hypothesis profile of this module: no deadline (the first call of a search may build a kd-tree), a modest number
# of examples so that the file runs in seconds on one core.
GEODESY = settings(deadline=None, max_examples=120)
RADIUS_M = 25.0
MARGIN_M = 1e-3  # pairs this close to the radius are left out: the chord and geodesic differ by 1.6e-11 m there
WGS84 = Geodesic.WGS84
SMALLEST_CURVATURE_RADIUS_M = WGS84_SEMI_MAJOR_AXIS_M * (1 - WGS84_FLATTENING * (2 - WGS84_FLATTENING))


def geodesic_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """The reference distance: Karney's geodesic on the WGS84 ellipsoid (geographiclib)."""
    return WGS84.Inverse(lat1, lon1, lat2, lon2)["s12"]


def moved(lat: float, lon: float, azimuth_deg: float, distance_m: float) -> tuple[float, float]:
    """The point distance_m along the geodesic leaving (lat, lon) at azimuth_deg."""
    line = WGS84.Direct(lat, lon, azimuth_deg, distance_m)
    return line["lat2"], line["lon2"]


def wrapped(lon: float) -> float:
    return (lon + 180.0) % 360.0 - 180.0


ZONE_BOUNDARIES = [-180.0 + 6.0 * k for k in range(60)]  # -180 is also the antimeridian
latitudes = st.one_of(
    st.floats(-90.0, 90.0),
    st.floats(-1e-3, 1e-3),  # across the equator
    st.sampled_from([-90.0, -80.0, 84.0, 90.0]).flatmap(
        lambda edge: st.floats(max(-90.0, edge - 1e-3), min(90.0, edge + 1e-3))
    ),  # UTM's limits and the poles
)
longitudes = st.one_of(
    st.floats(-180.0, 180.0, exclude_max=True),
    st.sampled_from(ZONE_BOUNDARIES).flatmap(lambda edge: st.floats(edge - 1e-3, edge + 1e-3)).map(wrapped),
)
offsets = st.lists(st.tuples(st.floats(0.0, 360.0), st.floats(0.0, 2 * RADIUS_M)), min_size=1, max_size=6)


def expected_positives(distances_m: list[float]) -> set[int]:
    return {i for i, distance in enumerate(distances_m) if distance <= RADIUS_M}


def found_positives(database: list[GeoPosition], query: GeoPosition) -> tuple[str, set[int]]:
    """The frame of database + [query] and the query's positives in it."""
    positions = database + [query]
    frame = common_frame(positions, [f"image {i}" for i in range(len(positions))], "pairs")
    database_frame, queries_frame = frame.split(len(database))
    positives = positives_within_radius(
        database_frame.coordinates, queries_frame.coordinates, RADIUS_M, algorithm=frame.search_algorithm
    )
    return frame.kind, set(positives[0].tolist())


# ----------------------------------------------------------------------------------------------------------------
# The frame, against the geodesic


def test_ecef_of_the_equator_and_the_pole():
    np.testing.assert_allclose(ecef_from_lat_lon(0.0, 0.0), [[WGS84_SEMI_MAJOR_AXIS_M, 0.0, 0.0]])
    np.testing.assert_allclose(ecef_from_lat_lon(0.0, 90.0), [[0.0, WGS84_SEMI_MAJOR_AXIS_M, 0.0]], atol=1e-9)
    polar_radius_m = WGS84_SEMI_MAJOR_AXIS_M * (1 - WGS84_FLATTENING)
    np.testing.assert_allclose(
        ecef_from_lat_lon([90.0, -90.0], [0.0, 0.0]), [[0, 0, polar_radius_m], [0, 0, -polar_radius_m]], atol=1e-9
    )
    with pytest.raises(ValueError, match="within \\[-90, 90\\]"):
        ecef_from_lat_lon(91.0, 0.0)


@GEODESY
@given(lat=latitudes, lon=longitudes, azimuth=st.floats(0.0, 360.0), distance_m=st.floats(0.0, 100_000.0))
def test_the_chord_is_shorter_than_the_geodesic_by_at_most_the_stated_bound(lat, lon, azimuth, distance_m):
    other = moved(lat, lon, azimuth, distance_m)
    chord_m = np.linalg.norm(np.diff(ecef_from_lat_lon([lat, other[0]], [lon, other[1]]), axis=0))
    bound_m = distance_m**3 / (24 * SMALLEST_CURVATURE_RADIUS_M**2)
    assert -1e-6 <= distance_m - chord_m <= bound_m + 1e-6


@GEODESY
@given(lat=latitudes, lon=longitudes, database_offsets=offsets)
def test_gps_positions_anywhere_are_positives_exactly_within_the_radius(lat, lon, database_offsets):
    database = [moved(lat, lon, azimuth, distance) for azimuth, distance in database_offsets]
    distances = [geodesic_m(lat, lon, *point) for point in database]
    if any(abs(distance - RADIUS_M) < MARGIN_M for distance in distances):
        return
    kind, positives = found_positives([position_from_gps(*p) for p in database], position_from_gps(lat, lon))
    assert kind == ECEF
    assert positives == expected_positives(distances)


def vg_name(lat: float, lon: float, note: str = "x", padded: bool = False) -> str:
    """The VG-format name of a WGS84 point, UTM in centimetres and degrees to 5 decimals, as the VPR-datasets-
    downloader writes them (padded: zero-padded fields, as in Pitts30k's names)."""
    east, north, zone_number, zone_letter = utm.from_latlon(lat, lon)
    if padded:
        return f"@{east:010.2f}@{north:010.2f}@{zone_number}@{zone_letter}@{lat:09.5f}@{lon:010.5f}@{note}@.jpg"
    return f"@{east:.2f}@{north:.2f}@{zone_number}@{zone_letter}@{lat:.5f}@{lon:.5f}@{note}@.jpg"


def name_lat_lon(name: str) -> tuple[float, float]:
    """Where a VG name's UTM fields put it (the reference the names are compared by)."""
    fields = name.split("@")
    return utm.to_latlon(float(fields[1]), float(fields[2]), int(fields[3]), fields[4])


vg_latitudes = st.one_of(st.floats(-79.9, 83.9), st.floats(-1e-3, 1e-3))
vg_longitudes = st.one_of(
    st.floats(-180.0, 180.0, exclude_max=True),
    st.sampled_from(ZONE_BOUNDARIES).flatmap(lambda edge: st.floats(edge - 3e-4, edge + 3e-4)).map(wrapped),
)


@GEODESY
@given(lat=vg_latitudes, lon=vg_longitudes, database_offsets=offsets)
def test_vg_names_in_several_zones_are_positives_exactly_within_the_radius(lat, lon, database_offsets):
    query_name = vg_name(lat, lon)
    zone = vg_name_coordinates(query_name)[2]
    elsewhere_lon = wrapped(lon + 12.0)  # two zones east (one of Svalbard's): the split always mixes zones
    names = [vg_name(*moved(lat, lon, azimuth, distance)) for azimuth, distance in database_offsets]
    names.append(vg_name(lat, elsewhere_lon))
    query_point = name_lat_lon(query_name)
    distances = [geodesic_m(*query_point, *name_lat_lon(name)) for name in names]
    if any(abs(distance - RADIUS_M) < MARGIN_M for distance in distances):
        return
    assert vg_name_coordinates(names[-1])[2] != zone
    kind, positives = found_positives([position_from_vg_name(n) for n in names], position_from_vg_name(query_name))
    assert kind == ECEF
    assert positives == expected_positives(distances)


@GEODESY
@given(
    east=st.floats(100_000.0, 999_999.99),
    north=st.floats(0.0, 9_999_999.99),
    zone_number=st.integers(1, 60),
    zone_letter=st.sampled_from("CDEFGHJKLMNPQRSTUVWXcx"),
    lat=st.floats(-90.0, 90.0),
    lon=st.floats(-180.0, 180.0),
    padded=st.booleans(),
    rest=st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789_-.", max_size=8), max_size=8),
)
def test_vg_names_round_trip(east, north, zone_number, zone_letter, lat, lon, padded, rest):
    east, north, lat, lon = (float(f"{v:.{d}f}") for v, d in ((east, 2), (north, 2), (lat, 5), (lon, 5)))
    width = (10, 10, 9, 10) if padded else (0, 0, 0, 0)
    name = (
        f"@{east:0{width[0]}.2f}@{north:0{width[1]}.2f}@{zone_number}@{zone_letter}@{lat:0{width[2]}.5f}"
        f"@{lon:0{width[3]}.5f}@{'@'.join(rest)}@.jpg"
    )
    hemisphere = "N" if zone_letter.upper() >= "N" else "S"
    assert vg_name_coordinates(name) == (east, north, f"{zone_number}{hemisphere}")
    assert vg_name_lat_lon(name) == (None if (lat, lon) == (0.0, 0.0) else (lat, lon))
    position = position_from_vg_name(name)
    assert position.east_north == (east, north) and position.zone == f"{zone_number}{hemisphere}"
    assert position.from_file_name


def test_vg_name_fields_that_are_not_a_zone_or_a_place_are_ignored():
    assert vg_name_coordinates("@583.25@4477.5@61@T@@.jpg")[2] is None  # zones are 1..60
    assert vg_name_coordinates("@583.25@4477.5@17@I@@.jpg")[2] is None  # no band I (nor O, A, B, Y, Z)
    assert vg_name_lat_lon("@583.25@4477.5@17@T@40.4@-80.0@.jpg") == (40.4, -80.0)
    assert vg_name_lat_lon("@583.25@4477.5@17@T@91@-80.0@.jpg") is None
    assert vg_name_lat_lon("@583.25@4477.5@17@T@0@0@.jpg") is None
    assert vg_name_lat_lon("@583.25@4477.5@17@T@40.4@.jpg") is None  # the extension is not a longitude


def test_one_zone_of_vg_names_stays_in_the_utm_plane_and_mixed_zones_are_logged(caplog):
    one_zone = [position_from_vg_name(vg_name(45.0, 9.0 + 1e-4 * i)) for i in range(3)]
    one_zone.append(position_from_vg_name("@500000.00@4980000.00@.jpg"))  # no zone: the split's zone
    with caplog.at_level(logging.INFO, logger="places.geodesy"):
        frame = common_frame(one_zone, ["a", "b", "c", "d"], "one zone")
    assert frame.kind == PLANAR_UTM and frame.ecef is None
    np.testing.assert_array_equal(frame.coordinates, [p.east_north for p in one_zone])
    assert caplog.text == ""
    two_zones = [position_from_vg_name(vg_name(45.0, 11.9999)), position_from_vg_name(vg_name(45.0, 12.0001))]
    with caplog.at_level(logging.INFO, logger="places.geodesy"):
        frame = common_frame(two_zones, ["a", "b"], "two zones")
    assert frame.kind == ECEF and frame.coordinates.shape == (2, 3)
    assert caplog.text.count("\n") == 1 and "two zones: images in 2 UTM zones (32N, 33N)" in caplog.text
    with pytest.raises(ValueError, match="1 images have UTM coordinates with no zone .*: c"):
        common_frame(two_zones + [one_zone[-1]], ["a", "b", "c"], "two zones")


# ----------------------------------------------------------------------------------------------------------------
# Regression tests: photos and VG-named files on disk, in folder and in dataset mode


def _rational_dms(value: float) -> tuple[IFDRational, IFDRational, IFDRational]:
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    seconds = (value - degrees - minutes / 60) * 3600
    return IFDRational(degrees, 1), IFDRational(minutes, 1), IFDRational(round(seconds * 1e6), 1_000_000)


def write_photo(path: Path, gps: tuple[float, float] | None = None) -> Path:
    """A small JPEG, with EXIF GPS tags when gps (latitude, longitude) is given."""
    exif = Image.Exif()
    if gps is not None:
        latitude, longitude = gps
        exif.get_ifd(ExifTags.IFD.GPSInfo).update(
            {
                1: "N" if latitude >= 0 else "S",
                2: _rational_dms(abs(latitude)),
                3: "E" if longitude >= 0 else "W",
                4: _rational_dms(abs(longitude)),
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (90, 120, 200)).save(path, quality=90, exif=exif)
    return path


def positive_names(index) -> list[list[str]]:
    """For each query, the file names of its positives."""
    return [[Path(index.database_paths[i]).name for i in p] for p in index.soft_positives_per_query]


def test_photos_metres_apart_across_a_zone_boundary_and_the_equator_are_positives(tmp_path):
    across_zones = ((45.0, 11.99996), (45.0, 12.00004))  # 6.3 m apart, zones 32 and 33
    across_equator = ((-0.00002, 30.0), (0.00002, 30.0))  # 4.4 m apart, 36S and 36N
    write_photo(tmp_path / "database" / "zones.jpg", across_zones[0])
    write_photo(tmp_path / "database" / "equator.jpg", across_equator[0])
    write_photo(tmp_path / "queries" / "zones.jpg", across_zones[1])
    write_photo(tmp_path / "queries" / "equator.jpg", across_equator[1])
    index = build_folder_split(tmp_path / "database", tmp_path / "queries")
    assert index.queries_paths == ["queries/equator.jpg", "queries/zones.jpg"]
    assert positive_names(index) == [["equator.jpg"], ["zones.jpg"]]  # R@1 100, not 50
    assert index.database_ecef.shape == (2, 3) and index.queries_ecef.shape == (2, 3)
    assert np.isfinite(index.database_utms).all()  # each photo's UTM in its own zone, for reference


def test_a_photo_470_km_away_is_never_a_positive(tmp_path, caplog):
    east, north, _, _ = utm.from_latlon(45.0, 9.0)
    far_lat, far_lon = utm.to_latlon(east, north, 33, "T")  # the same UTM numbers one zone east: 472 km away
    assert geodesic_m(45.0, 9.0, far_lat, far_lon) > 470_000
    write_photo(tmp_path / "database" / "IMG_0001.JPG", (45.0, 9.0))
    write_photo(tmp_path / "database" / f"@{east:.2f}@{north:.2f}@.jpg")  # a VG name without a zone
    write_photo(tmp_path / "queries" / "IMG_0002.JPG", (far_lat, far_lon))
    with caplog.at_level(logging.INFO, logger="places.folders"):
        unplaced = build_folder_split(tmp_path / "database", tmp_path / "queries")
    assert unplaced.soft_positives_per_query is None  # the zoneless name cannot be placed: no ground truth
    assert "with no zone" in caplog.text and "no ground truth" in caplog.text
    zoneless = next((tmp_path / "database").glob("@*"))
    zoneless.rename(zoneless.with_name(vg_name(far_lat, far_lon + 1e-4)))  # with a zone: 8 m from the query
    index = build_folder_split(tmp_path / "database", tmp_path / "queries")
    assert positive_names(index) == [[vg_name(far_lat, far_lon + 1e-4)]]


def make_vg_split(datasets_folder: Path, database: list[str], queries: list[str]) -> Path:
    split = datasets_folder / "mixed" / "images" / "test"
    for part, names in (("database", database), ("queries", queries)):
        for name in names:
            write_photo(split / part / name)
    return split


def test_vg_names_in_different_zones_are_compared_on_the_earth_in_both_modes(tmp_path):
    west, east = vg_name(45.0, 11.99996, "west"), vg_name(45.0, 12.00004, "east")  # 6.3 m apart
    planar_twin = vg_name(*utm.to_latlon(*utm.from_latlon(45.0, 9.0)[:2], 33, "T"), "twin")
    split = make_vg_split(tmp_path, [west, vg_name(45.0, 9.0, "far")], [east, planar_twin])
    expected = [[west], []]  # the twin has the far image's UTM numbers, one zone east: 472 km apart
    dataset = build_vg_split(tmp_path, "mixed", "test")
    assert dataset.queries_paths == [f"queries/{east}", f"queries/{planar_twin}"]
    assert positive_names(dataset) == expected
    folders = build_folder_split(split / "database", split / "queries")
    assert positive_names(folders) == expected


def test_vg_names_without_a_zone_among_several_zones_are_named(tmp_path):
    make_vg_split(tmp_path, [vg_name(45.0, 11.99996), "@500000.00@4980000.00@.jpg"], [vg_name(45.0, 12.00004)])
    with pytest.raises(DatasetError, match="with no zone .*@500000.00@4980000.00@.jpg"):
        build_vg_split(tmp_path, "mixed", "test")
