"""The built-in toy world: a small, deterministic, procedural VPR dataset in the VG-benchmark layout.

    <datasets_folder>/toy_world/images/{train,val,test}/{database,queries}/@east@north@...@.jpg
    <datasets_folder>/toy_world/toy_world.json      manifest, written last: config, version, counts, look-alikes

How the world is made:

* Every split lies in its own region (regions are 10 km apart in UTM), with parallel routes (polylines with gentle
  bends) 600 m apart. Along each route runs a street facade drawn once as a long strip at a fixed pixel-per-metre
  scale: sky gradient, buildings with roofs, window grids, doors, shop fronts, signs, trees, pavement and road.
* The facade is made of fixed-length *blocks*. A block's *layout* (building positions, widths, heights, wall and
  roof colours, roof shapes, trees) and its *details* (window grids and styles, doors, shop fronts, signs, lit
  windows) come from separate random streams.
* A camera standing on the route at arc length s looks sideways at the facade: an image is a crop of the strip
  centred on s, `view_width_m` wide, resized to `image_size`. Database images are taken every
  `database_spacing_m` metres in daylight. Queries are taken at random arc lengths (so the nearest database image
  is at most half a spacing away along the route), a little closer to or farther from the facade (zoom within
  about ±10 %), with a small vertical shift, a lighting (day / dusk / night: darker, tinted, lit windows), an
  exposure change, sensor noise, sometimes a slight blur, and in half of them parked vehicles or pedestrians in front
  of the ground floor (occluders the database images do not have).
* Look-alikes: some runs of `lookalike_blocks` blocks get the *layout* of a run on another route of the same split
  (hundreds of metres away) while keeping their own *details*. Their images are globally similar but differ in
  every window, door and sign, which is what local matching can tell apart. The manifest lists each run and the
  pairs of database images that show the same layout from the same relative position.

Measured 2026-11-27 on a 2-core machine (one process, Pillow 13, quiet), with
`python3 -m places.toy_world --force`:

* default: train 768 database + 720 queries, val 165 + 210, test 192 + 300 (2355 images at 144x192), 11.8 MB, 7 s
  (the training split has the most places: the reranker needs many to learn matching that transfers; the test split
  has 300 queries, so one query is a third of a point of R@1);
* small:   train 44 + 16, val 38 + 12, test 38 + 12 (160 images), 0.8 MB, under 1 s.

Files are byte-identical for the same config on the same Pillow/libjpeg; another JPEG library may encode differently.

Usage: `python3 -m places.toy_world --datasets_folder ./data --preset default`.

The package, one job per module: ``config`` (ToyWorldConfig, SplitSpec, their checks, presets, the manifest's JSON
form), ``layout`` (routes, facade blocks, look-alike runs), ``facade`` (drawing a route's facade strip), ``views``
(database images and queries: crops, lighting, occluders, noise, file names), ``writer`` (make_toy_world, the
manifest), ``__main__`` (the command line). The names the rest of the project uses are imported here.
"""

from places.toy_world.config import (
    GENERATOR_VERSION,
    MANIFEST_NAME,
    PRESETS,
    SPLITS,
    TOY_WORLD_NAME,
    SplitSpec,
    ToyWorldConfig,
    config_as_json,
    config_from_json,
)
from places.toy_world.writer import expected_counts, is_complete_world, make_toy_world, read_manifest

__all__ = [
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "PRESETS",
    "SPLITS",
    "TOY_WORLD_NAME",
    "SplitSpec",
    "ToyWorldConfig",
    "config_as_json",
    "config_from_json",
    "expected_counts",
    "is_complete_world",
    "make_toy_world",
    "read_manifest",
]
