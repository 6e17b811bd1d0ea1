"""Where images were taken, in one frame where straight-line distance is ground distance.

An image's position comes from a VG-format file name (UTM east, north, zone; latitude and longitude) or from EXIF GPS
(latitude and longitude). Positives are measured in one of two frames:

- **planar UTM**, (N, 2) metres, when every position comes from a VG-format name and all lie in one UTM zone (names
  without zone fields count as that zone): the VG benchmark's convention, so benchmark results stay the reference's.
  Inside a zone the UTM scale factor is 0.9996 to about 1.001, so a 25 m distance is off by at most about 2.5 cm.
- **WGS84 earth-centred coordinates (ECEF)**, (N, 3) metres, otherwise (zones mixed, EXIF GPS, or positions outside
  UTM's latitudes): right for any two points on the Earth, across zone boundaries, the equator, the antimeridian and
  near the poles. The chord between two surface points is shorter than the geodesic between them by less than
  s^3 / (24 M^2), with M = 6 335 439 m the ellipsoid's smallest radius of curvature: 1.6e-11 m at s = 25 m, far below
  a millimetre (by Schur's comparison theorem, no curve of curvature at most 1/M has a shorter chord than the circle
  of radius M). Heights are taken as zero (on the ellipsoid), as GPS altitude is too noisy to help.

The radius search itself is places.index.positives_within_radius, on whichever frame this module returns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import utm

from places.index import vg_name_coordinates, vg_name_lat_lon

logger = logging.getLogger(__name__)

WGS84_SEMI_MAJOR_AXIS_M = 6_378_137.0
WGS84_FLATTENING = 1 / 298.257223563
WGS84_ECCENTRICITY_SQUARED = WGS84_FLATTENING * (2 - WGS84_FLATTENING)
PLANAR_UTM, ECEF = "planar UTM", "ECEF"  # the two frames positives are measured in


@dataclass(frozen=True)
class GeoPosition:
    """Where one image was taken, as its source says: a VG-format file name (UTM, perhaps a zone and latitude and
    longitude) or EXIF GPS (latitude and longitude, UTM derived inside UTM's latitudes)."""

    east_north: tuple[float, float] | None  # UTM metres in `zone`; None outside UTM's latitudes (80 S to 84 N)
    zone: str | None  # UTM zone number and hemisphere, e.g. "32N"; None when unknown
    lat_lon: tuple[float, float] | None  # WGS84 degrees as the source gives them; None when it gives none
    from_file_name: bool  # True: a VG-format name, whose UTM the benchmark compares in a plane


@dataclass(frozen=True)
class Frame:
    """Coordinates of a set of positions in one frame where Euclidean distance is ground distance (see the module
    docstring for the two frames and their error bounds)."""

    kind: str  # PLANAR_UTM or ECEF
    coordinates: np.ndarray  # (N, 2) UTM metres or (N, 3) ECEF metres, float64

    @property
    def search_algorithm(self) -> str:
        """The sklearn radius search for positives_within_radius: the VG benchmark's "auto" in its UTM plane; a
        kd-tree in ECEF, whose exact coordinate differences keep sub-micrometre precision at the Earth's radius,
        where the dot products of a brute-force search lose about 0.2 mm at 25 m."""
        return "auto" if self.kind == PLANAR_UTM else "kd_tree"

    @property
    def ecef(self) -> np.ndarray | None:
        """The (N, 3) coordinates when the frame is ECEF, else None (what PlaceIndex.*_ecef hold)."""
        return self.coordinates if self.kind == ECEF else None

    def split(self, num_first: int) -> tuple[Frame, Frame]:
        """The frame of the first num_first positions (a split's database) and of the rest (its queries)."""
        return Frame(self.kind, self.coordinates[:num_first]), Frame(self.kind, self.coordinates[num_first:])


def ecef_from_lat_lon(lat_deg: np.ndarray | float, lon_deg: np.ndarray | float) -> np.ndarray:
    """WGS84 latitudes and longitudes (degrees, shape (N,) or scalars) on the ellipsoid -> (N, 3) ECEF metres."""
    lat = np.radians(np.atleast_1d(np.asarray(lat_deg, dtype=np.float64)))
    lon = np.radians(np.atleast_1d(np.asarray(lon_deg, dtype=np.float64)))
    if lat.shape != lon.shape or lat.ndim != 1:
        raise ValueError(f"latitudes and longitudes must be two (N,) arrays, got shapes {lat.shape} and {lon.shape}")
    if not (np.isfinite(lat).all() and np.isfinite(lon).all() and (np.abs(lat) <= np.pi / 2).all()):
        raise ValueError("latitudes must be finite and within [-90, 90] degrees, longitudes finite")
    # prime vertical radius of curvature at each latitude
    radius_n = WGS84_SEMI_MAJOR_AXIS_M / np.sqrt(1 - WGS84_ECCENTRICITY_SQUARED * np.sin(lat) ** 2)
    return np.stack(
        [
            radius_n * np.cos(lat) * np.cos(lon),
            radius_n * np.cos(lat) * np.sin(lon),
            radius_n * (1 - WGS84_ECCENTRICITY_SQUARED) * np.sin(lat),
        ],
        axis=1,
    )  # (N, 3)


def utm_from_lat_lon(lat_deg: float, lon_deg: float) -> tuple[float, float, str] | None:
    """(east, north, zone such as "32N") of a WGS84 position, or None outside UTM's latitudes (80 S to 84 N)."""
    try:
        east, north, zone_number, _ = utm.from_latlon(lat_deg, lon_deg)
    except utm.OutOfRangeError:
        return None
    return float(east), float(north), f"{zone_number}{'N' if lat_deg >= 0 else 'S'}"


def lat_lon_from_utm(east: float, north: float, zone: str) -> tuple[float, float] | None:
    """WGS84 (latitude, longitude) degrees of a UTM point in `zone` ("32N"), or None when it lies outside the
    ranges UTM defines (easting 100 to 1000 km, northing 0 to 10 000 km)."""
    try:
        lat, lon = utm.to_latlon(east, north, int(zone[:-1]), northern=zone[-1] == "N")
    except utm.OutOfRangeError:
        return None
    return float(lat), float(lon)


def position_from_gps(lat_deg: float, lon_deg: float) -> GeoPosition:
    """The position of a WGS84 latitude and longitude (EXIF GPS), with its UTM where UTM is defined."""
    planar = utm_from_lat_lon(lat_deg, lon_deg)
    return GeoPosition(
        east_north=None if planar is None else planar[:2],
        zone=None if planar is None else planar[2],
        lat_lon=(lat_deg, lon_deg),
        from_file_name=False,
    )


def position_from_vg_name(name: str) -> GeoPosition | None:
    """The position a VG-format file name '@east@north@zone@letter@lat@lon@...' gives (zone and latitude and
    longitude where those fields are valid), or None for any other name."""
    planar = vg_name_coordinates(name)
    if planar is None:
        return None
    return GeoPosition(east_north=planar[:2], zone=planar[2], lat_lon=vg_name_lat_lon(name), from_file_name=True)


def utm_array(positions: Sequence[GeoPosition]) -> np.ndarray:
    """(N, 2) UTM (east, north) metres of the positions, each in its own zone; NaN where UTM is undefined."""
    return np.array(
        [p.east_north if p.east_north is not None else (np.nan, np.nan) for p in positions], dtype=np.float64
    ).reshape(-1, 2)


def global_lat_lon(position: GeoPosition) -> tuple[float, float] | None:
    """(latitude, longitude) of a position anywhere on the Earth, or None when its source does not say.

    A VG-format name with a zone is converted from its UTM (centimetres in the names, where their latitude and
    longitude fields carry about a metre, or less where a generator wrote them approximately); its latitude and
    longitude fields serve when the zone is absent or its UTM lies outside the zone's ranges.
    """
    if position.from_file_name and position.zone is not None and position.east_north is not None:
        converted = lat_lon_from_utm(*position.east_north, position.zone)
        if converted is not None:
            return converted
    return position.lat_lon


def common_frame(positions: Sequence[GeoPosition], labels: Sequence[str], what: str) -> Frame:
    """The frame positives of these positions are measured in: planar UTM for VG-format names in one zone, else
    ECEF (module docstring). labels name the positions (e.g. paths) in messages; what names the set (e.g. the split).

    Logs one line when ECEF is chosen. ValueError naming up to five labels when ECEF is needed and some position
    has no latitude and longitude (a name with neither zone fields nor latitude and longitude, among several zones).
    """
    zones = sorted({p.zone for p in positions if p.zone is not None})
    if all(p.from_file_name and p.east_north is not None for p in positions) and len(zones) <= 1:
        return Frame(PLANAR_UTM, np.array([p.east_north for p in positions], dtype=np.float64).reshape(-1, 2))
    lat_lon = [global_lat_lon(p) for p in positions]
    unplaced = [label for label, found in zip(labels, lat_lon) if found is None]
    if unplaced:
        raise ValueError(
            f"{what}: {len(unplaced)} images have UTM coordinates with no zone (or outside their zone's ranges) and no "
            f"latitude and longitude, so they cannot be compared with images in {', '.join(zones) or 'no UTM zone'} "
            f"or with GPS positions: "
            f"{', '.join(unplaced[:5])}{' and more' if len(unplaced) > 5 else ''}"
        )
    logger.info(
        "%s: %s, so distances are measured between WGS84 earth-centred coordinates, not in a UTM plane",
        what,
        _why_ecef(positions, zones),
    )
    lat_lon_array = np.array(lat_lon, dtype=np.float64).reshape(-1, 2)
    return Frame(ECEF, ecef_from_lat_lon(lat_lon_array[:, 0], lat_lon_array[:, 1]))


def _why_ecef(positions: Sequence[GeoPosition], zones: list[str]) -> str:
    """The reason a set of positions is not compared in one UTM plane, in words for the log."""
    from_gps = sum(not p.from_file_name for p in positions)
    reasons = [f"images in {len(zones)} UTM zones ({', '.join(zones)})"] if len(zones) > 1 else []
    if from_gps:
        reasons.append(f"{from_gps} positions from EXIF GPS")
    outside = sum(p.east_north is None for p in positions)
    if outside:
        reasons.append(f"{outside} outside UTM's latitudes")
    return ", ".join(reasons)
