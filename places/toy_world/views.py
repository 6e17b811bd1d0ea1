"""The toy world's cameras: where database images and queries are taken along a route, how each sees the facade
strip (crop, zoom, lighting, occluders, exposure, blur, sensor noise), and the VG-benchmark file name of each."""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from places.toy_world.config import (
    LIGHTINGS,
    QUERY_STREAM,
    SPLITS,
    SplitSpec,
    ToyWorldConfig,
    margin_blocks,
    rng_for,
)
from places.toy_world.facade import strip_top_z_m
from places.toy_world.layout import approximate_lat_lon, camera_heading_deg, jitter_colour, pick, point_on_route

# Per-channel gains and the strength of lit windows for each lighting.
LIGHTING_GAINS = {"day": (1.0, 1.0, 1.0), "dusk": (0.85, 0.7, 0.6), "night": (0.36, 0.38, 0.52)}
LIT_WINDOW_STRENGTH = {"day": 0.0, "dusk": 0.4, "night": 0.7}
LIT_WINDOW_RGB = (255, 206, 120)
QUERY_TIMESTAMPS = {"day": "20250314T1100", "dusk": "20250314T1930", "night": "20250314T2300"}
DATABASE_TIMESTAMP = "20240615T1200"
# The 256 quantiles of the standard normal distribution at (i + 0.5) / 256: random bytes index them to make noise.
GAUSSIAN_QUANTILES = np.array([NormalDist().inv_cdf((index + 0.5) / 256) for index in range(256)])
OCCLUDER_PALETTE = ((200, 30, 30), (30, 60, 160), (230, 230, 230), (30, 30, 30), (120, 120, 128), (230, 190, 30))


@dataclass(frozen=True)
class View:
    """One image to render: where the camera stands, how it sees the facade, and its lighting."""

    arc_length_m: float
    lateral_offset_m: float  # towards the facade
    vertical_shift_m: float
    lighting: str


def database_views(config: ToyWorldConfig, spec: SplitSpec) -> list[View]:
    """Daylight views every `database_spacing_m` along a route of `spec`, from its start to its end."""
    count = int(spec.route_length_m // config.database_spacing_m) + 1
    return [View(index * config.database_spacing_m, 0.0, 0.0, "day") for index in range(count)]


def query_views(config: ToyWorldConfig, split_index: int, route_index: int) -> list[View]:
    """Views at random arc lengths between the first and the last database image of a route, shifted sideways and
    vertically, under random lightings; sorted along the route."""
    spec: SplitSpec = getattr(config, SPLITS[split_index])
    rng = rng_for(config, QUERY_STREAM, split_index, route_index)
    weights = np.array(config.query_lighting_weights) / sum(config.query_lighting_weights)
    last_database_arc_m = database_views(config, spec)[-1].arc_length_m
    views = []
    for _ in range(spec.queries_per_route):
        views.append(
            View(
                arc_length_m=float(rng.uniform(0.0, last_database_arc_m)),
                lateral_offset_m=float(rng.uniform(-config.max_lateral_offset_m, config.max_lateral_offset_m)),
                vertical_shift_m=float(rng.uniform(-config.max_vertical_shift_m, config.max_vertical_shift_m)),
                lighting=LIGHTINGS[int(rng.choice(len(LIGHTINGS), p=weights))],
            )
        )
    return sorted(views, key=lambda view: view.arc_length_m)


def crop_box(config: ToyWorldConfig, view: View) -> tuple[float, float, float, float]:
    """Strip pixel box (x0, y0, x1, y1) seen by `view`; closer to the facade means a narrower box."""
    height, width = config.image_size
    view_width_m = config.view_width_m * (config.facade_distance_m - view.lateral_offset_m) / config.facade_distance_m
    view_height_m = view_width_m * height / width
    centre_x_m = view.arc_length_m + margin_blocks(config) * config.block_length_m
    centre_y_m = strip_top_z_m(config) - (config.camera_centre_height_m + view.vertical_shift_m)
    scale = config.pixels_per_metre
    return (
        (centre_x_m - view_width_m / 2) * scale,
        (centre_y_m - view_height_m / 2) * scale,
        (centre_x_m + view_width_m / 2) * scale,
        (centre_y_m + view_height_m / 2) * scale,
    )


def render_database_image(config: ToyWorldConfig, strip: Image.Image, view: View) -> Image.Image:
    """A clean daylight crop of the strip."""
    height, width = config.image_size
    return strip.resize((width, height), Image.Resampling.BILINEAR, box=crop_box(config, view))


def render_query_image(
    config: ToyWorldConfig, strip: Image.Image, lit_mask: Image.Image, view: View, rng: np.random.Generator
) -> Image.Image:
    """A crop of the strip under the view's lighting, with an exposure change, optional blur and sensor noise."""
    height, width = config.image_size
    box = crop_box(config, view)
    image = strip.resize((width, height), Image.Resampling.BILINEAR, box=box)
    if rng.random() < config.occlusion_probability:
        draw_occluders(ImageDraw.Draw(image), rng, (height, width), int(rng.integers(1, config.max_occluders + 1)))
    if rng.random() < config.blur_probability:
        image = image.filter(ImageFilter.BoxBlur(config.blur_radius_px))
    exposure = rng.uniform(*config.exposure_range)
    image = image.point(channel_gain_table(LIGHTING_GAINS[view.lighting], exposure))
    lit_strength = LIT_WINDOW_STRENGTH[view.lighting]
    if lit_strength > 0:
        lit_weight = lit_mask.resize((width, height), Image.Resampling.BILINEAR, box=box)
        lit_weight = lit_weight.point([round(value * lit_strength) for value in range(256)])
        lit_rgb = tuple(min(255, round(channel * exposure)) for channel in LIT_WINDOW_RGB)
        image = Image.composite(Image.new("RGB", image.size, lit_rgb), image, lit_weight)
    return add_sensor_noise(image, rng.uniform(*config.noise_sigma_range), rng)


def draw_occluders(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: tuple[int, int], count: int) -> None:
    """`count` occluders near the camera, in image pixels of `size` (H, W): parked vehicles (a body, a cabin with
    windows, two wheels) or pedestrians, standing at the bottom of the view in front of the ground floor."""
    height, width = size
    for _ in range(count):
        colour = jitter_colour(rng, pick(rng, OCCLUDER_PALETTE), 20)
        centre_x = rng.uniform(0.0, width)
        if rng.random() < 0.6:  # a vehicle
            half_width, bottom = rng.uniform(0.11, 0.2) * width, rng.uniform(0.93, 1.0) * height
            body_top = bottom - rng.uniform(0.13, 0.2) * height
            cabin_half, cabin_top = half_width * rng.uniform(0.55, 0.8), body_top - rng.uniform(0.08, 0.12) * height
            draw.rectangle([centre_x - cabin_half, cabin_top, centre_x + cabin_half, body_top], fill=colour)
            draw.rectangle(
                [centre_x - 0.85 * cabin_half, cabin_top + 2, centre_x + 0.85 * cabin_half, body_top - 1],
                fill=(40, 48, 58),
            )
            body_bottom = bottom - 0.03 * height
            draw.rectangle([centre_x - half_width, body_top, centre_x + half_width, body_bottom], fill=colour)
            radius = 0.045 * height
            for wheel_x in (centre_x - 0.65 * half_width, centre_x + 0.65 * half_width):
                draw.ellipse([wheel_x - radius, bottom - 2 * radius, wheel_x + radius, bottom], fill=(20, 20, 22))
        else:  # a pedestrian
            half_width, bottom = rng.uniform(0.015, 0.025) * width, rng.uniform(0.86, 0.97) * height
            top = bottom - rng.uniform(0.2, 0.3) * height
            head = 1.2 * half_width
            draw.ellipse([centre_x - head, top, centre_x + head, top + 2 * head], fill=(224, 182, 150))
            draw.rectangle([centre_x - half_width, top + 2 * head, centre_x + half_width, bottom], fill=colour)


def channel_gain_table(gains: tuple[float, float, float], exposure: float) -> list[int]:
    """Image.point table (3 x 256 entries) that multiplies R, G and B by their gain times `exposure`."""
    return [min(255, round(value * gain * exposure)) for gain in gains for value in range(256)]


def add_sensor_noise(image: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    """`image` plus approximately Gaussian noise of standard deviation `sigma` (0-255 units), independent per pixel.

    Each noise value is a quantile of the normal distribution picked by a random byte: as random as drawing
    normals, several times faster.
    """
    noise_table = np.round(sigma * GAUSSIAN_QUANTILES).astype(np.int16)
    random_bytes = np.frombuffer(rng.bytes(image.width * image.height * 3), dtype=np.uint8)
    noise = np.take(noise_table, random_bytes).reshape(image.height, image.width, 3)
    pixels = np.asarray(image, dtype=np.int16) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def image_name(config: ToyWorldConfig, vertices: np.ndarray, view: View, pano_id: str, timestamp: str) -> str:
    """VG-benchmark file name of `view`: `@east@north@zone@letter@lat@lon@pano_id@tile@heading@pitch@roll@height
    @timestamp@note@.jpg`, with the camera's UTM position (centimetres), its compass heading and the lighting as note.
    """
    point, direction_rad = point_on_route(vertices, view.arc_length_m)
    east_m, north_m = point + view.lateral_offset_m * np.array([-math.sin(direction_rad), math.cos(direction_rad)])
    latitude, longitude = approximate_lat_lon(east_m, north_m, config.utm_zone_number)
    heading = camera_heading_deg(direction_rad)
    return (
        f"@{east_m:.2f}@{north_m:.2f}@{config.utm_zone_number}@{config.utm_zone_letter}@{latitude:.6f}"
        f"@{longitude:.6f}@{pano_id}@0@{heading:.1f}@0@0@2.5@{timestamp}@{view.lighting}@.jpg"
    )
