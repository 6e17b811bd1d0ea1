"""Rendering a route's facade: one long strip at a fixed pixel-per-metre scale (sky, buildings with roofs, window
grids, doors, shop fronts, signs, trees, pavement and road) and its lit-window mask. Block layouts come from
layout.py; the details (windows, doors, signs, lit windows) are drawn from each block's own random stream."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from places.toy_world.config import (
    DETAIL_STREAM,
    SPLITS,
    SplitSpec,
    ToyWorldConfig,
    num_blocks,
    rng_for,
    zoom_out_limit,
)
from places.toy_world.layout import ROOF_PALETTE, BlockLayout, BuildingLayout, TreeLayout, jitter_colour, pick

# Vertical layout of the facade, in metres above the building base (negative: pavement and road in front).
PAVEMENT_DEPTH_M = 1.5
SKY_TOP_RGB = (92, 142, 214)
SKY_HORIZON_RGB = (196, 218, 238)
ROAD_RGB = (72, 72, 78)
PAVEMENT_RGB = (158, 156, 150)
GLASS_PALETTE = ((46, 62, 84), (70, 92, 110), (36, 40, 48), (96, 120, 140), (58, 76, 70))
SIGN_PALETTE = (
    (220, 30, 40),
    (30, 90, 200),
    (250, 200, 20),
    (20, 150, 70),
    (240, 120, 20),
    (150, 40, 170),
    (250, 250, 250),
    (20, 20, 20),
    (0, 170, 190),
    (240, 90, 160),
)


@dataclass(frozen=True)
class StripGeometry:
    """Mapping from facade metres to strip pixels: x from the strip start, z up from the building base."""

    pixels_per_metre: float
    top_z_m: float
    bottom_z_m: float
    length_m: float

    def x_px(self, x_m: float) -> float:
        """Pixel column of the facade position `x_m` (also converts lengths)."""
        return x_m * self.pixels_per_metre

    def y_px(self, z_m: float) -> float:
        """Pixel row of the height `z_m`."""
        return (self.top_z_m - z_m) * self.pixels_per_metre

    @property
    def size_px(self) -> tuple[int, int]:
        """(width, height) of the strip image."""
        return (
            round(self.length_m * self.pixels_per_metre),
            round((self.top_z_m - self.bottom_z_m) * self.pixels_per_metre),
        )


def strip_top_z_m(config: ToyWorldConfig) -> float:
    """Height of the strip's top row above the building base: every view, zoomed out and shifted, fits below it."""
    height, width = config.image_size
    half_view_height_m = 0.5 * config.view_width_m * height / width * zoom_out_limit(config)
    return config.camera_centre_height_m + half_view_height_m + config.max_vertical_shift_m + 0.5


def strip_geometry(config: ToyWorldConfig, spec: SplitSpec) -> StripGeometry:
    """Strip size that holds every view of a route of `spec`; it is symmetric about the camera centre height."""
    top_z_m = strip_top_z_m(config)
    return StripGeometry(
        config.pixels_per_metre,
        top_z_m,
        2 * config.camera_centre_height_m - top_z_m,
        num_blocks(config, spec) * config.block_length_m,
    )


def draw_background(geometry: StripGeometry) -> Image.Image:
    """Sky gradient above, pavement and road below the building base line."""
    width_px, height_px = geometry.size_px
    rows = np.arange(height_px, dtype=np.float32)[:, None]
    horizon_px = geometry.y_px(0.0)
    blend = np.clip(rows / horizon_px, 0.0, 1.0)  # 0 at the top, 1 at the base line
    column = (1 - blend) * np.array(SKY_TOP_RGB) + blend * np.array(SKY_HORIZON_RGB)  # (height_px, 3)
    column[rows[:, 0] >= horizon_px] = PAVEMENT_RGB
    column[rows[:, 0] >= geometry.y_px(-PAVEMENT_DEPTH_M)] = ROAD_RGB
    strip = np.broadcast_to(column.astype(np.uint8)[:, None, :], (height_px, width_px, 3))
    return Image.fromarray(np.ascontiguousarray(strip), "RGB")


def draw_street_markings(draw: ImageDraw.ImageDraw, geometry: StripGeometry) -> None:
    """Kerb line, paving joints and a dashed road marking along the whole strip."""
    width_px, _ = geometry.size_px
    kerb_y = geometry.y_px(-PAVEMENT_DEPTH_M)
    draw.rectangle([0, kerb_y - 2, width_px, kerb_y], fill=(120, 118, 112))
    for x_m in np.arange(0.0, geometry.length_m, 1.5):
        draw.line([geometry.x_px(x_m), geometry.y_px(0.0), geometry.x_px(x_m), kerb_y], fill=(140, 138, 132))
    dash_y = geometry.y_px(-PAVEMENT_DEPTH_M - 1.6)
    for x_m in np.arange(0.0, geometry.length_m, 6.0):
        draw.rectangle([geometry.x_px(x_m), dash_y, geometry.x_px(x_m + 3.0), dash_y + 3], fill=(226, 226, 220))


def draw_building_body(
    draw: ImageDraw.ImageDraw, geometry: StripGeometry, building: BuildingLayout, block_start_m: float
) -> None:
    """Wall and roof (gable or cornice) of one building."""
    x0, x1 = (
        geometry.x_px(block_start_m + building.start_m),
        geometry.x_px(block_start_m + building.start_m + building.width_m),
    )
    top_y = geometry.y_px(building.height_m)
    draw.rectangle([x0, top_y, x1, geometry.y_px(0.0)], fill=building.wall_rgb)
    if building.gabled:
        ridge_y = geometry.y_px(building.height_m + min(0.3 * building.width_m, 3.0))
        overhang_px = geometry.x_px(0.3)
        draw.polygon(
            [(x0 - overhang_px, top_y), (x1 + overhang_px, top_y), ((x0 + x1) / 2, ridge_y)], fill=building.roof_rgb
        )
    else:
        draw.rectangle(
            [x0, geometry.y_px(building.height_m + 0.3), x1, geometry.y_px(building.height_m - 0.4)],
            fill=building.roof_rgb,
        )


def draw_window(
    draw: ImageDraw.ImageDraw,
    mask: ImageDraw.ImageDraw,
    box: tuple[float, float, float, float],
    style: int,
    glass_rgb: tuple,
    frame_rgb: tuple,
    lit: bool,
) -> None:
    """One window in pixel box (x0, y0, x1, y1): 0 plain, 1 cross bars, 2 shutters, 3 arched top."""
    x0, y0, x1, y1 = box
    if style == 3:
        draw.ellipse([x0, y0 - (x1 - x0) / 2, x1, y0 + (x1 - x0) / 2], fill=glass_rgb)
        mask.ellipse([x0, y0 - (x1 - x0) / 2, x1, y0 + (x1 - x0) / 2], fill=255 if lit else 0)
    draw.rectangle(box, fill=glass_rgb, outline=frame_rgb, width=1)
    mask.rectangle(box, fill=255 if lit else 0)
    if style == 1:
        draw.line([(x0 + x1) / 2, y0, (x0 + x1) / 2, y1], fill=frame_rgb, width=2)
        draw.line([x0, (y0 + y1) / 2, x1, (y0 + y1) / 2], fill=frame_rgb, width=2)
    elif style == 2:
        shutter_px = (x1 - x0) / 2
        draw.rectangle([x0 - shutter_px, y0, x0 - 1, y1], fill=frame_rgb)
        draw.rectangle([x1 + 1, y0, x1 + shutter_px, y1], fill=frame_rgb)


def draw_sign(draw: ImageDraw.ImageDraw, rng: np.random.Generator, centre: tuple[float, float], size_px: float) -> None:
    """A small distinctive sign: a coloured disc, square, triangle or diamond with a contrasting glyph inside."""
    cx, cy = centre
    half = size_px / 2
    colour, glyph_colour = (SIGN_PALETTE[int(i)] for i in rng.choice(len(SIGN_PALETTE), size=2, replace=False))
    shape = int(rng.integers(4))
    outline = [(cx - half, cy - half), (cx + half, cy + half)]
    if shape == 0:
        draw.ellipse(outline, fill=colour)
    elif shape == 1:
        draw.rectangle(outline, fill=colour)
    elif shape == 2:
        draw.polygon([(cx - half, cy + half), (cx + half, cy + half), (cx, cy - half)], fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=colour)
    glyph = int(rng.integers(3))
    inner = half * 0.45
    if glyph == 0:
        draw.rectangle([cx - inner, cy - inner / 3, cx + inner, cy + inner / 3], fill=glyph_colour)
    elif glyph == 1:
        draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=glyph_colour)
    else:
        draw.rectangle([cx - inner / 3, cy - inner, cx + inner / 3, cy + inner], fill=glyph_colour)


def draw_building_details(
    draw: ImageDraw.ImageDraw,
    mask: ImageDraw.ImageDraw,
    geometry: StripGeometry,
    building: BuildingLayout,
    block_start_m: float,
    rng: np.random.Generator,
) -> None:
    """Window grid, door or shop front, and signs of one building, all drawn from `rng`."""
    floor_height_m = rng.uniform(3.0, 3.6)
    num_floors = max(1, int((building.height_m - 0.8) // floor_height_m))
    window_pitch_m = rng.uniform(1.8, 3.0)
    num_columns = max(1, int((building.width_m - 1.0) // window_pitch_m))
    column_step_m = building.width_m / num_columns
    window_width_m = min(window_pitch_m, column_step_m) * rng.uniform(0.38, 0.6)
    window_height_m = floor_height_m * rng.uniform(0.38, 0.58)
    style = int(rng.integers(4))
    glass_rgb = jitter_colour(rng, pick(rng, GLASS_PALETTE), 12)
    frame_rgb = jitter_colour(rng, (int(rng.integers(30, 240)),) * 3, 30)
    left_m = block_start_m + building.start_m
    for floor in range(1, num_floors):
        bottom_m = floor * floor_height_m + 0.5 * (floor_height_m - window_height_m)
        for column in range(num_columns):
            centre_m = left_m + (column + 0.5) * column_step_m
            box = (
                geometry.x_px(centre_m - window_width_m / 2),
                geometry.y_px(bottom_m + window_height_m),
                geometry.x_px(centre_m + window_width_m / 2),
                geometry.y_px(bottom_m),
            )
            draw_window(draw, mask, box, style, glass_rgb, frame_rgb, lit=bool(rng.random() < 0.35))
    draw_ground_floor(draw, mask, geometry, building, left_m, column_step_m, num_columns, rng)
    for _ in range(int(rng.integers(0, 3))):
        size_m = rng.uniform(0.8, 1.5)
        centre_m = left_m + rng.uniform(size_m, max(size_m, building.width_m - size_m))
        height_m = rng.uniform(2.8, max(2.8, min(building.height_m - 1.0, 5.5)))
        draw_sign(draw, rng, (geometry.x_px(centre_m), geometry.y_px(height_m)), size_m * geometry.pixels_per_metre)


def draw_ground_floor(
    draw: ImageDraw.ImageDraw,
    mask: ImageDraw.ImageDraw,
    geometry: StripGeometry,
    building: BuildingLayout,
    left_m: float,
    column_step_m: float,
    num_columns: int,
    rng: np.random.Generator,
) -> None:
    """Either a shop front (glass and striped awning) or a door with plain windows beside it."""
    if rng.random() < 0.35 and building.width_m > 5.0:
        x0, x1 = geometry.x_px(left_m + 0.8), geometry.x_px(left_m + building.width_m - 0.8)
        glass_box = (x0, geometry.y_px(2.4), x1, geometry.y_px(0.3))
        draw.rectangle(glass_box, fill=jitter_colour(rng, (60, 74, 84), 20), outline=(30, 30, 30), width=2)
        mask.rectangle(glass_box, fill=255 if rng.random() < 0.7 else 0)
        stripe_colours = [SIGN_PALETTE[int(i)] for i in rng.choice(len(SIGN_PALETTE), size=2, replace=False)]
        stripe_px = geometry.x_px(rng.uniform(0.4, 0.9))
        for index, stripe_x in enumerate(np.arange(x0, x1, stripe_px)):
            draw.rectangle(
                [stripe_x, geometry.y_px(3.1), min(stripe_x + stripe_px, x1), geometry.y_px(2.5)],
                fill=stripe_colours[index % 2],
            )
        return
    door_column = int(rng.integers(num_columns))
    door_width_m = rng.uniform(1.1, 1.7)
    door_rgb = jitter_colour(rng, pick(rng, SIGN_PALETTE + ROOF_PALETTE), 20)
    for column in range(num_columns):
        centre_m = left_m + (column + 0.5) * column_step_m
        if column == door_column:
            draw.rectangle(
                [
                    geometry.x_px(centre_m - door_width_m / 2),
                    geometry.y_px(rng.uniform(2.2, 2.6)),
                    geometry.x_px(centre_m + door_width_m / 2),
                    geometry.y_px(0.0),
                ],
                fill=door_rgb,
            )
        else:
            box = (geometry.x_px(centre_m - 0.5), geometry.y_px(2.2), geometry.x_px(centre_m + 0.5), geometry.y_px(0.9))
            draw.rectangle(box, fill=(52, 60, 70), outline=(30, 30, 30), width=1)
            mask.rectangle(box, fill=255 if rng.random() < 0.4 else 0)


def tree_boxes(geometry: StripGeometry, tree: TreeLayout, block_start_m: float) -> tuple[list[float], list[float]]:
    """Pixel boxes [x0, y0, x1, y1] of the trunk and of the round crown of one tree standing on the pavement."""
    centre_x = geometry.x_px(block_start_m + tree.centre_m)
    trunk_half_px = geometry.x_px(0.18)
    crown_centre_y = geometry.y_px(tree.trunk_height_m + tree.crown_radius_m)
    radius_px = geometry.x_px(tree.crown_radius_m)
    trunk_box = [centre_x - trunk_half_px, crown_centre_y, centre_x + trunk_half_px, geometry.y_px(-0.6)]
    crown_box = [centre_x - radius_px, crown_centre_y - radius_px, centre_x + radius_px, crown_centre_y + radius_px]
    return trunk_box, crown_box


def render_facade(
    config: ToyWorldConfig, split_index: int, route_index: int, layouts: list[BlockLayout]
) -> tuple[Image.Image, Image.Image]:
    """The route's facade strip (RGB) and its lit-window mask (L, 255 where a window lights up at night)."""
    spec: SplitSpec = getattr(config, SPLITS[split_index])
    geometry = strip_geometry(config, spec)
    strip = draw_background(geometry)
    lit_mask = Image.new("L", geometry.size_px, 0)
    draw, mask_draw = ImageDraw.Draw(strip), ImageDraw.Draw(lit_mask)
    draw_street_markings(draw, geometry)
    for block_index, layout in enumerate(layouts):
        block_start_m = block_index * config.block_length_m  # strip metres, not arc length
        details_rng = rng_for(config, DETAIL_STREAM, split_index, route_index, block_index)
        for building in layout.buildings:
            draw_building_body(draw, geometry, building, block_start_m)
            draw_building_details(draw, mask_draw, geometry, building, block_start_m, details_rng)
    for block_index, layout in enumerate(layouts):  # trees last: they stand in front of every building
        for tree in layout.trees:
            trunk_box, crown_box = tree_boxes(geometry, tree, block_index * config.block_length_m)
            draw.rectangle(trunk_box, fill=(92, 66, 44))
            draw.ellipse(crown_box, fill=tree.crown_rgb)
            mask_draw.rectangle(trunk_box, fill=0)
            mask_draw.ellipse(crown_box, fill=0)
    return strip, lit_mask
