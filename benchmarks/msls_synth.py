"""An MSLS-val-sized synthetic split for timing evaluation end to end (no download): 18,871 database and 740 query
JPEGs at 640x480 in the VG-benchmark layout, generated in parallel and cached.

    python benchmarks/msls_synth.py --folder /tmp/prgs_msls_synth --workers 16
    python test.py --datasets_folder /tmp/prgs_msls_synth --dataset_name msls_synth --split test ...

Images are procedural street-like pictures (gradients, blocks, edges and sensor noise; about 75 kB each) so that
JPEG decoding costs about what a photo of this size costs; they carry no place information (recalls are
meaningless, timings are not). Places lie 2 m apart along a line; each query sits within 10 m of a database image.
A finished split has a manifest; a second run with the same counts returns at once.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

DATABASE_NUM, QUERIES_NUM = 18_871, 740  # MSLS val (cph + sf)
SIZE = (640, 480)  # (W, H)
NAME = "msls_synth"
MANIFEST = "manifest.json"


def image_name(east: float, north: float, number: int) -> str:
    return f"@{east:.2f}@{north:.2f}@33@U@55.0@12.0@synth{number:06d}@.jpg"


_BANK: list[np.ndarray] = []  # per process: a few noisy backgrounds, built once and reused


def _background(rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: a vertical sky/ground gradient with sensor noise."""
    width, height = SIZE
    rows = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    pixels = rng.uniform(60, 200, 3).astype(np.float32) * (1 - rows) + rng.uniform(40, 160, 3) * rows
    pixels = pixels * np.ones((1, width, 1), np.float32) + rng.normal(0, 6, (height, width, 3)).astype(np.float32)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def render(seed: int) -> Image.Image:
    """A 640x480 RGB picture: one of 8 noisy backgrounds, shifted, with random facade blocks and window grids."""
    if not _BANK:
        _BANK.extend(_background(np.random.default_rng([7, k])) for k in range(8))
    rng = np.random.default_rng(seed)
    width, height = SIZE
    pixels = np.roll(_BANK[seed % len(_BANK)], (int(rng.integers(height)), int(rng.integers(width))), axis=(0, 1))
    for _ in range(rng.integers(6, 14)):  # facade blocks with windows
        x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height // 2))
        x1, y1 = int(min(width, x0 + rng.integers(40, 260))), int(min(height, y0 + rng.integers(80, 400)))
        pixels[y0:y1, x0:x1] = (pixels[y0:y1, x0:x1] // 4 + rng.integers(20, 170, 3, dtype=np.uint8)).astype(np.uint8)
        step = int(rng.integers(12, 30))
        pixels[y0:y1:step, x0:x1] //= 2
        pixels[y0:y1, x0:x1:step] //= 2
    return Image.fromarray(pixels, "RGB")


def write_image(job: tuple[str, int]) -> int:
    path, seed = job
    render(seed).save(path, format="JPEG", quality=90)
    return os.path.getsize(path)


def jobs(folder: Path, database_num: int, queries_num: int) -> list[tuple[str, int]]:
    split = folder / NAME / "images" / "test"
    work = []
    for index in range(database_num):
        work.append((str(split / "database" / image_name(500_000.0 + 2.0 * index, 5_000_000.0, index)), index))
    rng = np.random.default_rng(0)
    for index in range(queries_num):
        east = 500_000.0 + 2.0 * rng.integers(0, database_num) + rng.uniform(-10, 10)
        work.append((str(split / "queries" / image_name(east, 5_000_000.0, database_num + index)), 10**6 + index))
    return work


def make_split(folder: Path, workers: int, database_num: int = DATABASE_NUM, queries_num: int = QUERIES_NUM) -> dict:
    """Generate (or find cached) the split under ``folder``/msls_synth; returns the manifest."""
    manifest_path = folder / NAME / MANIFEST
    wanted = {"database_num": database_num, "queries_num": queries_num, "size": list(SIZE)}
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if {k: manifest.get(k) for k in wanted} == wanted:
            return {**manifest, "cached": True}
    for part in ("database", "queries"):
        (folder / NAME / "images" / "test" / part).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(write_image, jobs(folder, database_num, queries_num), chunksize=64))
    seconds = time.perf_counter() - start
    manifest = {
        **wanted,
        "workers": workers,
        "seconds": round(seconds, 2),
        "images_per_s": round(len(sizes) / seconds, 1),
        "mean_kb": round(sum(sizes) / len(sizes) / 1024, 1),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return {**manifest, "cached": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/prgs_msls_synth"), help="datasets folder")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="processes writing images")
    parser.add_argument("--database_num", type=int, default=DATABASE_NUM, help="database images")
    parser.add_argument("--queries_num", type=int, default=QUERIES_NUM, help="query images")
    args = parser.parse_args()
    print(json.dumps(make_split(args.folder, args.workers, args.database_num, args.queries_num)), flush=True)


if __name__ == "__main__":
    main()
