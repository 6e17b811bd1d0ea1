"""test.py end to end on the MSLS-val-sized synthetic split (benchmarks/msls_synth.py), once per setting, each in its
own process: per-stage seconds, images/s, queries/s, peak host RSS and peak GPU memory.

    python benchmarks/bench_e2e.py --datasets_folder /tmp/prgs_msls_synth --out OUT/e2e.json \
        --settings reference fast_pil fast_torchvision --fast_kernel fused_tf32 --fast_precision bf16

Stages (from results.json's timings): load = waiting for decoded images on the device (DataLoader workers or the
device's JPEG decoder), forward = the network, store_write = the stage-0 self graph (when precomputed) and the
store write, retrieval = faiss, read_wait = the reranker waiting for store rows, expand = rows to reranker input,
rerank_forward = the reranker. "waits" are load and read_wait: time one stage spent waiting on another.
The model is untrained (random weights, no download): timings are those of the real model's shapes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["--dataset_name", "msls_synth", "--split", "test", "--backbone_weights", "none", "--recall_values", "1", "5",
          "10", "100", "--num_workers", "14"]  # fmt: skip
SETTINGS = {
    # the reference's arithmetic: float32, the plain reranker, 2 queries per call, float32 features, PIL decoding
    "reference": ["--precision", "fp32", "--rerank_kernel", "plain", "--store_dtype", "float32",
                  "--image_decoder", "pil", "--infer_batch_size", "32", "--rerank_batch_size", "2"],
    # + --rerank_kernel FAST_KERNEL --precision FAST_PRECISION (pick_fast.py)
    "fast_pil": ["--image_decoder", "pil", "--infer_batch_size", "64", "--rerank_batch_size", "8",
                 "--rerank_cuda_graphs"],
    "fast_torchvision": ["--image_decoder", "torchvision", "--infer_batch_size", "64", "--rerank_batch_size", "8",
                         "--rerank_cuda_graphs"],
}  # fmt: skip


def run_setting(name: str, flags: list[str], args) -> dict:
    """One test.py process; its results.json reduced to the stages."""
    output = Path(args.work) / name
    command = [sys.executable, "-u", "test.py", "--datasets_folder", str(args.datasets_folder), *COMMON, *flags,
               "--device", args.device, "--output_folder", str(output)]  # fmt: skip
    if name.startswith("fast"):
        command += ["--rerank_kernel", args.fast_kernel, "--precision", args.fast_precision]
    start = time.perf_counter()
    timeout = min(args.timeout, args.hard_stop - time.time()) if args.hard_stop else args.timeout
    completed = subprocess.run(command, capture_output=True, text=True, timeout=max(5.0, timeout))
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        return {"setting": name, "command": " ".join(command), "error": completed.stderr[-2000:]}
    results = json.loads((output / "results.json").read_text())
    return {"setting": name, "command": " ".join(command), "process_wall_s": wall, **stages(results)}


STAGES = {"load": "load", "forward": "forward", "store_write": "store_write", "read_wait": "rerank_read_wait",
          "expand": "rerank_expand", "rerank_forward": "rerank_forward"}  # fmt: skip


def stages(results: dict) -> dict:
    timings, dataset = results["timings"], results["dataset"]
    database, queries = dataset["database_num"], dataset["queries_num"]

    def seconds(key: str) -> float:  # a per-image (database + queries) or per-query figure -> seconds
        if f"{key}_ms_per_image_database" in timings:
            per_image = timings[f"{key}_ms_per_image_database"] * database
            return (per_image + timings[f"{key}_ms_per_image_queries"] * queries) / 1000
        return timings[f"{key}_ms_per_query"] * queries / 1000

    stage = {name: seconds(key) for name, key in STAGES.items()}
    stage.update(
        extraction=timings["extraction_seconds"],
        retrieval=timings["retrieval_seconds"],
        rerank=timings["rerank_seconds"],
    )
    total = timings["total_seconds"]
    return {
        "total_s": total,
        "stages_s": {k: round(v, 3) for k, v in stage.items()},
        "waits_share_of_total": {k: round(stage[k] / total, 3) for k in ("load", "read_wait")},
        "images_per_s": (database + queries) / stage["extraction"],
        "queries_per_s": queries / stage["rerank"],
        "memory": results["memory"],
        "store": results["store"],
        "recalls": results["recalls"],
        "images": database + queries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets_folder", type=Path, required=True, help="where msls_synth.py wrote the split")
    parser.add_argument("--out", type=Path, required=True, help="JSON file, rewritten after every setting")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS), help="what to run")
    parser.add_argument("--fast_kernel", default="fused_tf32", help="--rerank_kernel of the fast settings")
    parser.add_argument("--fast_precision", default="bf16", help="--precision of the fast settings")
    parser.add_argument("--device", default="cuda", help="--device of test.py")
    parser.add_argument("--work", default="/tmp/prgs_e2e", help="test.py output folders")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per setting")
    parser.add_argument("--deadline", type=float, default=0.0, help="unix time after which settings are skipped")
    parser.add_argument("--hard_stop", type=float, default=0.0, help="unix time at which a running test.py is killed")
    args = parser.parse_args()
    rows = []
    for name in args.settings:
        if args.deadline and time.time() > args.deadline:
            rows.append({"setting": name, "error": "deadline"})
            continue
        try:
            rows.append(run_setting(name, SETTINGS[name], args))
        except Exception as error:  # noqa: BLE001 - a timeout or a missing file: record and go on
            rows.append({"setting": name, "error": f"{type(error).__name__}: {error}"[:500]})
        print(json.dumps(rows[-1]), flush=True)
        args.out.write_text(json.dumps(rows, indent=2))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    columns = ["load", "forward", "store_write", "retrieval", "read_wait", "expand", "rerank_forward"]
    print(f"\n{'setting':17s} {'total s':>7s} {'img/s':>6s} {'q/s':>6s} " + " ".join(f"{c[:7]:>7s}" for c in columns)
          + f" {'RSS MB':>7s} {'GPU MB':>7s}")  # fmt: skip
    for row in rows:
        if "error" in row:
            print(f"{row['setting']:17s} error: {row['error'][-150:]}")
            continue
        memory = row["memory"]
        print(
            f"{row['setting']:17s} {row['total_s']:7.1f} {row['images_per_s']:6.0f} {row['queries_per_s']:6.1f} "
            + " ".join(f"{row['stages_s'][c]:7.2f}" for c in columns)
            + f" {memory['peak_host_rss_mb']:7.0f} {memory.get('peak_gpu_allocated_mb', 0):7.0f}"
        )


if __name__ == "__main__":
    main()
