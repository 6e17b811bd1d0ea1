"""Local-feature store: bytes per image, and evaluation RAM against the number of images stored (CPU).

    python benchmarks/bench_store.py --num_images 2000 20000

For each size: write a store at the reference settings (30x40 grid, 1000 of 1200 nodes kept, local_dim 128), then,
in a fresh process, read the candidates of 200 queries x top-100 two queries at a time (as test.py's reranking loop
does) and report that process's peak resident memory and the read rate. The reference would hold
num_images x 628,800 B in RAM instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from feature_store import REFERENCE_BYTES_PER_IMAGE, LocalFeatureStore  # noqa: E402
from model.local_features import build_nodes  # noqa: E402

GRID, IMAGE_SIZE, KEPT, LOCAL_DIM = (30, 40), (480, 640), 1000, 128


def write_store(folder: Path, num_images: int, batch: int = 64) -> None:
    generator = torch.Generator().manual_seed(0)
    nodes = build_nodes(
        torch.randn(batch, 1200, LOCAL_DIM, generator=generator),
        torch.rand(batch, 1200, generator=generator),
        GRID,
        IMAGE_SIZE,
        16,
        KEPT,
    )
    store = LocalFeatureStore.create(folder, num_images, GRID, IMAGE_SIZE, 16, KEPT, LOCAL_DIM)
    for start in range(0, num_images, batch):
        indices = np.arange(start, min(start + batch, num_images))
        store.write(indices, nodes[: len(indices)])
    store.close()


def read_like_test_py(folder: Path, num_queries: int = 200, top: int = 100, per_call: int = 2) -> dict:
    """Runs in a fresh process: the reranking loop's reads only."""
    store = LocalFeatureStore.open(folder)
    rng = np.random.default_rng(0)
    database_num = store.num_images - num_queries
    start = time.perf_counter()
    for first in range(0, num_queries, per_call):
        queries = np.arange(first, min(first + per_call, num_queries))
        store.read(database_num + queries)
        store.read(rng.choice(database_num, (len(queries), top)).reshape(-1))
    seconds = time.perf_counter() - start
    store.close()
    read_bytes = num_queries * (1 + top) * store.bytes_per_image
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "read_mb_per_s": read_bytes / 2**20 / seconds,
        "ms_per_query": 1000 * seconds / num_queries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, nargs="+", default=[2000, 20000], help="store sizes to measure")
    parser.add_argument("--folder", type=Path, default=None, help="where to write the stores (default: a temp dir)")
    parser.add_argument("--read_only", type=Path, default=None, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.read_only is not None:
        print(json.dumps(read_like_test_py(args.read_only)))
        return
    base = args.folder or Path(tempfile.mkdtemp(prefix="prgs_store_bench_"))
    rows = []
    for num_images in args.num_images:
        folder = base / f"store_{num_images}"
        write_store(folder, num_images)
        child = subprocess.run(
            [sys.executable, __file__, "--read_only", str(folder)], capture_output=True, text=True, check=True
        )
        row = {
            "num_images": num_images,
            "store_bytes_per_image": LocalFeatureStore.open(folder).bytes_per_image,
            "reference_ram_gb": num_images * REFERENCE_BYTES_PER_IMAGE / 1e9,
            **json.loads(child.stdout),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(folder)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
