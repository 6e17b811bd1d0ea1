"""CPU: the reranker and test.py before the fast kernels (a copy of the code before them, --before_repo) and after
(the CPU defaults: precomputed stage 0, store in RAM; and the plain kernel with the disk store). Runs alternate
between the settings so that a changing machine load hits all alike; medians are reported with the load average.

    git archive fdd87d6 | tar -x -C /tmp/prgs_before        # the code before the fast kernels
    python benchmarks/bench_cpu_rerank.py --golden_dir ../shared/reference/golden --before_repo /tmp/prgs_before

Part 1: the reranker at top-100 x 1200 nodes (131 channels, 200 zeroed rows, golden weights), one query per call:
ms/query of the plain path against the stage0 path, and what precomputing stage 0 costs per image.
Part 2: test.py on the toy world (untrained model, --num_workers 0), whole runs, rerank_ms_per_query and total.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_gpu import reranker_input  # noqa: E402

from model.reranker import RERANK_KERNELS, GraphReranker  # noqa: E402

GRID = (30, 40)


def reranker_part(golden_dir: Path | None, repeats: int) -> dict:
    reranker = GraphReranker().eval()
    if golden_dir is not None:
        reranker.load_state_dict(torch.load(golden_dir / "reranker_state_dict.pt", weights_only=True))
    nodes = reranker_input(1)
    with torch.inference_mode():
        stage0 = reranker.stage0_self_graph(nodes.flatten(0, 1).unsqueeze(1), GRID).reshape(nodes.shape)
    times = {"plain": [], "stage0": [], "stage0_per_image": []}
    for _ in range(repeats):  # alternating
        for name, x in (("plain", nodes), ("stage0", stage0)):
            start = time.perf_counter()
            with torch.inference_mode():
                reranker(x, GRID, RERANK_KERNELS[name])
            times[name].append(1000 * (time.perf_counter() - start))
        start = time.perf_counter()
        with torch.inference_mode():
            reranker.stage0_self_graph(nodes[0, :32].unsqueeze(1), GRID)
        times["stage0_per_image"].append(1000 * (time.perf_counter() - start) / 32)
    return {name: {"median_ms": statistics.median(t), "all_ms": [round(v, 1) for v in t]} for name, t in times.items()}


REPO = Path(__file__).resolve().parents[1]
SETTINGS = {  # name -> (which code, flags)
    "before the fast kernels": ("before", []),
    "after, CPU defaults (stage0, store in RAM)": ("after", []),
    "after, plain kernel, disk store": ("after", ["--rerank_kernel", "plain", "--store_tier", "disk"]),
}


def test_py_part(datasets_folder: Path, before_repo: Path, repeats: int) -> dict:
    runs = {name: [] for name in SETTINGS}
    rng = random.Random(0)
    for number in range(repeats):
        order = list(SETTINGS.items())
        rng.shuffle(order)  # no setting always runs right after another
        for index, (name, (code, flags)) in enumerate(order):
            output = Path(f"/tmp/prgs_cpu_bench/{number}_{index}")
            command = [sys.executable, "test.py", "--datasets_folder", str(datasets_folder.resolve()), "--device",
                       "cpu", "--num_workers", "0", "--output_folder", str(output), *flags]  # fmt: skip
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, cwd=before_repo if code == "before" else REPO)
            results = json.loads((output / "results.json").read_text())
            runs[name].append({"wall_s": time.perf_counter() - start, "timings": results["timings"],
                               "recalls": results["recalls"], "store": results["store"]})  # fmt: skip
    summary = {}
    for name, rows in runs.items():
        summary[name] = {
            key: statistics.median(r["timings"][key] for r in rows)
            for key in ("rerank_ms_per_query", "rerank_forward_ms_per_query", "total_seconds")
        }
        summary[name]["extraction_ms_per_image_database"] = statistics.median(
            r["timings"]["extraction_ms_per_image_database"] for r in rows
        )
        summary[name]["recalls"] = rows[0]["recalls"]
        summary[name]["store"] = rows[0]["store"]
    return {"summary": summary, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--golden_dir", type=Path, default=None, help="../shared/reference/golden (golden weights)")
    parser.add_argument("--datasets_folder", type=Path, default=Path("data"), help="where the toy world is")
    parser.add_argument("--before_repo", type=Path, default=None, help="a copy of the code before the fast kernels")
    parser.add_argument("--out", type=Path, default=Path("cpu_rerank.json"), help="results")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repetitions of each setting")
    parser.add_argument("--parts", nargs="+", default=["reranker", "test_py"], choices=["reranker", "test_py"])
    args = parser.parse_args()
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "load_before": os.getloadavg()}
    if "reranker" in args.parts:
        results["reranker_top100_1200_nodes"] = reranker_part(args.golden_dir, args.repeats)
        print(json.dumps(results["reranker_top100_1200_nodes"]), flush=True)
    if "test_py" in args.parts:
        results["test_py_toy_world"] = test_py_part(args.datasets_folder, args.before_repo, args.repeats)
        print(json.dumps(results["test_py_toy_world"]["summary"], indent=1), flush=True)
    results["load_after"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
