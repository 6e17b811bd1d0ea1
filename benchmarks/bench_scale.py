"""Scale-out benchmark: extraction images/s and training steps/s launched by torchrun (one process per GPU), and
--faiss_index against exact search (recall@1/5/10, query time) on the toy world and on a synthetic database.

    python benchmarks/bench_scale.py --out OUT                  # everything (needs a CUDA GPU), about 2 minutes
    python benchmarks/bench_scale.py --out OUT --parts faiss    # the faiss comparison only (CPU or GPU)

Parts:
- gpu: the default toy world (generated first), read at the reference's settings (DeiT-S, 480x640, bf16, random
  weights): ``torchrun --nproc_per_node <GPUs> test.py --split train`` (1488 images; images/s from results.json, with
  and without image loading) and ``torchrun ... train_reranking.py --train_stage reranker --max_steps`` (optimiser
  steps/s of 8 tuples of 1 + 1 + 18 images, from results.json's throughput: mining and validation excluded).
- faiss: global descriptors of the toy world's train split (toy preset, random weights), and a synthetic database of
  --database_size random unit vectors (256-d) whose queries are noisy copies of database rows (the row is the one
  correct answer): exact search against each --factories index, trained on --train_size rows, at each --nprobe.

Writes OUT/bench_scale.json and prints a table last. Figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from datasets_ws import SplitRequest, load_split  # noqa: E402
from extraction import ExtractionSettings, global_descriptors  # noqa: E402
from metrics import recall_at_n  # noqa: E402
from model.network import ModelConfig, PRGSNetwork  # noqa: E402
from places import toy_world  # noqa: E402
from retrieval import build_index, exact_knn, faiss_uses_gpu, search_index  # noqa: E402

RECALLS = [1, 5, 10]
REFERENCE_SETTINGS = [
    "--backbone", "deit_small", "--resize", "480", "640", "--local_dim", "128", "--backbone_weights", "none",
    "--precision", "bf16", "--device", "cuda",
]  # fmt: skip


def torchrun(script: str, flags: list[str], log: Path) -> dict:
    """Run ``torchrun --standalone --nproc_per_node <visible GPUs> script flags``; its results.json."""
    output = log.with_suffix("")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", str(torch.cuda.device_count()), str(REPO / script), *flags]
    command += ["--output_folder", str(output)]
    with open(log, "w") as file:
        completed = subprocess.run(command, stdout=file, stderr=subprocess.STDOUT, cwd=REPO)
    if completed.returncode:
        sys.exit(f"{script} failed (exit {completed.returncode}); its output: {log}\n{log.read_text()[-3000:]}")
    return json.loads((output / "results.json").read_text())


def gpu_part(data: Path, out: Path, workers: int) -> dict:
    """Extraction images/s (test.py) and training steps/s (train_reranking.py), one process per visible GPU."""
    common = ["--datasets_folder", str(data), "--num_workers", str(workers), *REFERENCE_SETTINGS]
    started = time.perf_counter()
    test = torchrun("test.py", [*common, "--split", "train", "--infer_batch_size", "64", "--rerank_top", "20",
                                "--rerank_batch_size", "4"], out / "test.log")  # fmt: skip
    test_seconds = time.perf_counter() - started
    timings, ranks = test["timings"], test["distributed"]
    train = torchrun("train_reranking.py", [*common, "--train_stage", "reranker", "--mining", "partial",
                     "--neg_samples_num", "200", "--negs_num_per_query", "18", "--train_batch_size", "8",
                     "--queries_per_epoch", "240", "--cache_refresh_rate", "240", "--max_steps", "30",
                     "--infer_batch_size", "64"], out / "train.log")  # fmt: skip
    return {
        "world_size": ranks["world_size"],
        "extraction": {
            "images": sum(ranks["images_per_rank"]),
            "images_per_second_with_loading": round(1000 / timings["extraction_ms_per_image_database"], 1),
            "images_per_second_forward": round(1000 / timings["forward_ms_per_image_database"], 1),
            "test_py_wall_seconds": round(test_seconds, 1),
        },
        "training": train["throughput"],
    }


def toy_descriptors(data: Path, device: torch.device) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Global descriptors of the toy world's train split (toy preset, random weights): database, queries, positives."""
    index = load_split(SplitRequest(data, "toy_world", "train"))
    torch.manual_seed(0)
    model = PRGSNetwork(ModelConfig(backbone="deit_micro", image_size=(144, 192), local_dim=32)).to(device)
    descriptors = global_descriptors(model, index, np.arange(len(index)), ExtractionSettings((144, 192), device, 64, 4))
    return descriptors[: index.database_num], descriptors[index.database_num :], index.soft_positives_per_query


def synthetic(size: int, queries: int, noise: float, dimension: int = 256) -> tuple[np.ndarray, np.ndarray, list]:
    """``size`` random unit vectors; ``queries`` noisy copies of random rows (noise of norm ``noise`` relative to
    the row, then renormalised); the copied row is each query's one positive."""
    rng = np.random.default_rng(0)
    database = rng.standard_normal((size, dimension), dtype=np.float32)
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    source = rng.choice(size, queries, replace=False)
    perturbation = rng.standard_normal((queries, dimension), dtype=np.float32)
    perturbation *= noise / np.linalg.norm(perturbation, axis=1, keepdims=True)
    copies = database[source] + perturbation
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    return database, copies, [np.array([s]) for s in source]


def compare(name: str, database, queries, positives, factories, nprobes, train_size, device) -> list[dict]:
    """Exact search, then each index (trained and filled once) at each nprobe: recall@1/5/10 and milliseconds per
    query (all queries in one search call)."""
    started = time.perf_counter()
    _, exact = exact_knn(database, queries, max(RECALLS), device)
    exact_ms = 1000 * (time.perf_counter() - started) / len(queries)
    rows = [{"data": name, "database": len(database), "queries": len(queries), "index": "Flat (exact)",
             "nprobe": None, "recalls": recall_at_n(exact, positives, RECALLS), "ms_per_query": exact_ms}]  # fmt: skip
    for factory in factories:
        index, timings = build_index(database, factory, train_size, device)
        for nprobe in nprobes:
            _, found, ms_per_query = search_index(index, queries, max(RECALLS), factory, nprobe)
            rows.append({**rows[0], "index": factory, "nprobe": nprobe, **timings, "ms_per_query": ms_per_query,
                         "recalls": recall_at_n(found, positives, RECALLS),
                         "train_size": min(train_size, len(database))})  # fmt: skip
    for row in rows:
        row["recalls"] = {f"R@{n}": round(v, 2) for n, v in row["recalls"].items()}
    return rows


def table(results: dict) -> str:
    lines = []
    if "gpu" in results:
        gpu = results["gpu"]
        lines.append(f"world size {gpu['world_size']} (torchrun, one process per GPU)")
        lines.append(f"extraction: {gpu['extraction']['images_per_second_with_loading']} images/s with loading, "
                     f"{gpu['extraction']['images_per_second_forward']} images/s forward only")  # fmt: skip
        lines.append(f"training: {gpu['training']['steps_per_second']} steps/s (global batch "
                     f"{gpu['training']['global_batch']} tuples)")  # fmt: skip
    lines.append(f"{'data':10}{'database':>10}{'index':>16}{'nprobe':>7}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'ms/q':>9}"
                 f"{'train s':>9}{'add s':>8}")  # fmt: skip
    for row in results.get("faiss", []):
        recalls = row["recalls"]
        lines.append(f"{row['data']:10}{row['database']:>10}{row['index']:>16}{str(row['nprobe'] or '-'):>7}"
                     f"{recalls['R@1']:7.2f}{recalls['R@5']:7.2f}{recalls['R@10']:7.2f}{row['ms_per_query']:9.3f}"
                     f"{row.get('train_seconds', 0):9.1f}{row.get('add_seconds', 0):8.1f}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench_out")))
    parser.add_argument("--data", type=Path, default=Path("/tmp/prgs_scale_data"), help="toy world folder")
    parser.add_argument("--parts", nargs="+", choices=("gpu", "faiss"), default=["gpu", "faiss"])
    parser.add_argument("--database_size", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.5, help="query noise norm relative to the unit row")
    parser.add_argument("--factories", nargs="+", default=["IVF4096,PQ32"])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--train_size", type=int, default=100_000)
    parser.add_argument("--num_workers", type=int, default=8)
    args = parser.parse_args()
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {"environment": environment(device), "arguments": {k: str(v) for k, v in vars(args).items()}}
    toy_world.make_toy_world(args.data, progress=False)
    if "gpu" in args.parts:
        results["gpu"] = gpu_part(args.data, args.out, args.num_workers)
        save(results, args.out)
    if "faiss" in args.parts:
        toy = toy_descriptors(args.data, device)
        results["faiss"] = compare("toy train", *toy, ["IVF16,PQ32x4"], [1, 4], 100_000, device)
        save(results, args.out)
        big = synthetic(args.database_size, args.queries, args.noise)
        results["faiss"] += compare("synthetic", *big, args.factories, args.nprobe, args.train_size, device)
    results["seconds"] = round(time.perf_counter() - started, 1)
    save(results, args.out)
    print(table(results))


def save(results: dict, out: Path) -> None:
    """bench_scale.json, rewritten after each part (a run cut short keeps what it measured)."""
    (out / "bench_scale.json").write_text(json.dumps(results, indent=2))


def environment(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "gpus": torch.cuda.device_count(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "faiss_gpu": faiss_uses_gpu(device),
        "faiss_threads": faiss.omp_get_max_threads(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


if __name__ == "__main__":
    main()
