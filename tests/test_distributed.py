"""Several processes: the sharding rules in one process, then real 2-rank runs on the CPU (torchrun, gloo) against
one-process runs: training, test.py, and a rank that fails."""

import contextlib
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from short_runs import SHORT_TRAINING

import distributed
import extraction
import retrieval
import test as test_script
import train_reranking
import training
from datasets_ws import SplitRequest, load_split
from feature_store import LocalFeatureStore, ShardedStore
from metrics import recall_at_n
from model.network import ModelConfig, PRGSNetwork
from retrieval import RetrievalError, approximate_knn, exact_knn

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num_workers", "0", "--infer_batch_size", "16", "--recall_values", "1", "5"]


def torchrun(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 script args`` on the CPU, one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, str(REPO_ROOT / script), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def _with_ranks(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: world)


# ----------------------------------------------------------------------------------------------------------------
# The sharding rules, in one process


def test_shards_are_whole_batches_covering_everything_once():
    for count, batch, world in ((38, 16, 2), (12, 8, 2), (100, 7, 3), (5, 16, 4), (0, 4, 2)):
        parts = [range(count)[distributed.shard_bounds(count, batch, r, world)] for r in range(world)]
        assert [i for part in parts for i in part] == list(range(count))  # in order, each once
        for part in parts[:-1]:
            assert len(part) % batch == 0 or part.stop == count  # only the very last batch may be short
        batches = [-(-len(part) // batch) for part in parts]
        assert max(batches) - min(batches) <= 1


def test_each_rank_takes_its_contiguous_share_of_every_global_batch(monkeypatch):
    shares = []
    for rank in (0, 1):
        _with_ranks(monkeypatch, rank, 2)
        shares.append(training.rank_share(num_tuples=10, batch_size=4, first_tuple=4))  # after step 0
    assert shares[0].tolist() == [4, 5] and shares[1].tolist() == [6, 7]  # batch 1 only (batch 2 would be partial)
    _with_ranks(monkeypatch, 0, 1)
    assert training.rank_share(10, 4, 0).tolist() == list(range(8))
    _with_ranks(monkeypatch, 0, 3)
    with pytest.raises(distributed.DistributedError, match="must be a multiple of the 3 processes"):
        training.per_process_batch(4)


def _nodes(count: int, grid=(6, 8), local_dim=5, num_kept=40) -> torch.Tensor:
    from model.local_features import build_nodes

    generator = torch.Generator().manual_seed(count)
    descriptors = torch.randn(count, grid[0] * grid[1], local_dim, generator=generator)
    attention = torch.rand(count, grid[0] * grid[1], generator=generator)
    return build_nodes(descriptors, attention, grid, (grid[0] * 16, grid[1] * 16), 16, num_kept)


def test_the_ranks_stores_read_as_one(tmp_path):
    """Two ranks' stores (as extract_features writes them) give the rows one store of every image gives."""
    database_num, queries_num, batch = 11, 6, 4
    nodes = _nodes(database_num + queries_num)
    holder, rows = extraction.shard_layout(database_num, queries_num, batch, world=2)
    assert holder.tolist() == [0] * 4 + [1] * 7 + [0] * 4 + [1] * 2  # whole batches of the database, then queries
    one = LocalFeatureStore.create(tmp_path / "one", len(nodes), (6, 8), (96, 128), 16, 40, 5)
    one.write(np.arange(len(nodes)), nodes)
    one.close()
    for rank in (0, 1):
        mine = np.flatnonzero(holder == rank)
        store = LocalFeatureStore.create(tmp_path / "shards" / f"rank_{rank}", len(mine), (6, 8), (96, 128), 16, 40, 5)
        store.write(rows[mine], nodes[mine])
        store.close()
    sharded = ShardedStore.open(tmp_path / "shards", holder, rows)
    wanted = [16, 0, 9, 3, 12, 10, 10]
    for got, expected in zip(
        sharded.read_compact(wanted), LocalFeatureStore.open(tmp_path / "one").read_compact(wanted)
    ):
        assert torch.equal(got, expected)
    expanded = sharded.expand(*sharded.read_compact(wanted))
    assert torch.equal(expanded, LocalFeatureStore.open(tmp_path / "one").read(wanted))


def test_the_frozen_backbone_cache_is_split_in_whole_batches(small_toy_world, monkeypatch):
    """Each rank caches its whole batches; concatenated in rank order they are the one-process cache, bit for bit."""
    model = PRGSNetwork(ModelConfig(backbone="deit_micro", image_size=(144, 192), local_dim=32)).eval()
    index = load_split(SplitRequest(small_toy_world, "toy_world", "val"))
    arguments = (model, index, extraction.ExtractionSettings((144, 192), torch.device("cpu"), 16, 0, "fp32"))
    whole = extraction.FrozenBackboneCache(*arguments)
    parts = []
    for rank in (0, 1):
        _with_ranks(monkeypatch, rank, 2)
        monkeypatch.setattr(distributed, "gather_rows", lambda rows: rows)  # this rank's part alone
        monkeypatch.setattr(distributed, "stop_together", lambda stage: contextlib.nullcontext())
        parts.append(extraction.FrozenBackboneCache(*arguments))
    assert [len(part.tokens) for part in parts] == [32, 18]
    assert torch.equal(torch.cat([part.tokens for part in parts]), whole.tokens)
    assert torch.equal(torch.cat([part.attention for part in parts]), whole.attention)
    assert np.array_equal(np.concatenate([part.descriptors for part in parts]), whole.descriptors)


# ----------------------------------------------------------------------------------------------------------------
# --faiss_index


@pytest.fixture
def one_faiss_thread():
    """faiss's k-means with several OpenMP threads spin-waits badly on a loaded 2-core machine (100x slower)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def test_ivf_pq_finds_noisy_copies_and_explains_what_it_cannot_do(one_faiss_thread):
    rng = np.random.default_rng(0)
    database = rng.standard_normal((2000, 32)).astype(np.float32)
    source = rng.choice(len(database), 100, replace=False)
    queries = database[source] + 0.2 * rng.standard_normal((100, 32)).astype(np.float32)
    positives = [np.array([s]) for s in source]
    _, exact = exact_knn(database, queries, 10)
    _, approximate, timings = approximate_knn(database, queries, 10, "IVF8,PQ8x4", nprobe=2, train_size=2000)
    assert recall_at_n(exact, positives, [1])[1] == 100.0
    assert recall_at_n(approximate, positives, [10])[10] >= 90.0
    assert set(timings) == {"train_seconds", "add_seconds", "ms_per_query"}
    with pytest.raises(RetrievalError, match="not a faiss index-factory string"):
        approximate_knn(database, queries, 10, "IVFx,PQ8", 2, 2000)
    with pytest.raises(RetrievalError, match=r"cannot be trained on 100 database descriptors .*PQmx4"):
        approximate_knn(database, queries, 10, "IVF4,PQ8", 2, 100)
    with pytest.raises(RetrievalError, match="raise --faiss_nprobe"):
        approximate_knn(database[:400], queries, 300, "IVF16,Flat", 1, 400)


def test_faiss_gpu_splits_the_database_over_the_visible_gpus(monkeypatch, caplog):
    """With faiss-gpu (faked here: this machine has faiss-cpu), indexes go to every visible GPU with the rows split
    among them; an index faiss-gpu cannot hold stays on the CPU with a warning."""
    cloned = []

    class Options:
        shard = False

    def to_all_gpus(index, co):
        cloned.append(co.shard)
        return index

    monkeypatch.setattr(retrieval, "faiss_uses_gpu", lambda device: True)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus, raising=False)
    database = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    _, found = exact_knn(database, database[:3], 1, torch.device("cuda"))
    assert cloned == [True] and found[:, 0].tolist() == [0, 1, 2]

    def refuse(index, co):
        raise RuntimeError("not supported on the GPU")

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", refuse, raising=False)
    _, found = exact_knn(database, database[:3], 1, torch.device("cuda"))
    assert found[:, 0].tolist() == [0, 1, 2] and "searching on the CPU" in caplog.text


def test_test_py_reports_the_faiss_index_beside_exact_search(small_toy_world, tmp_path, monkeypatch, one_faiss_thread):
    monkeypatch.chdir(tmp_path)
    flags = ["--datasets_folder", str(small_toy_world), "--faiss_index", "IVF2,PQ8x4", "--faiss_nprobe", "2", *FAST]
    results = test_script.main(flags)
    retrieval = results["retrieval"]
    assert retrieval["index"] == "IVF2,PQ8x4" and retrieval["nprobe"] == 2 and retrieval["train_size"] == 38
    assert set(retrieval["exact_recalls"]) == {"R@1", "R@5"} and retrieval["exact_ms_per_query"] > 0
    assert results["distributed"] == {"world_size": 1, "images_per_rank": [50], "queries_per_rank": [12]}


# ----------------------------------------------------------------------------------------------------------------
# Two ranks against one process


def _train_flags(datasets, output, *extra):
    return [
        "--datasets_folder",
        str(datasets),
        "--output_folder",
        str(output),
        *SHORT_TRAINING,
        "--train_stage",
        "reranker",
        "--mining",
        "partial",
        "--backbone_weights",
        "none",
        "--epochs_num",
        "1",
        "--cache_frozen_backbone",
        *FAST,
        *extra,
    ]


def test_two_ranks_continue_a_run_as_one_process_does(small_toy_world, tmp_path):
    """One process stops after step 1 of 4; two ranks resume it (global batch 4 = 2 x 2; the frozen-backbone cache,
    validation and the final test shared) and end with one process's weights, within 1e-4 (lr 1e-3: a weight moves
    up to 1e-3 per Adam step, sign-like, so float rounding in the gradient's sum shows most in near-zero gradients)."""
    train_reranking.main(_train_flags(small_toy_world, tmp_path / "straight"))
    train_reranking.main(_train_flags(small_toy_world, tmp_path / "stopped", "--max_steps", "1"))
    resumed = tmp_path / "resumed"
    flags = _train_flags(small_toy_world, resumed, "--resume", str(tmp_path / "stopped" / "last.pth"))
    completed = torchrun("train_reranking.py", *flags, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    straight = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    two = torch.load(resumed / "last.pth", weights_only=True)
    assert two["training_state"]["world_size"] == 2 and two["training_state"]["state"]["global_step"] == 4
    assert not any(key.startswith("module.") for key in two["model_state_dict"])
    for key, value in straight["model_state_dict"].items():
        torch.testing.assert_close(two["model_state_dict"][key], value, rtol=0, atol=1e-4, msg=key)
    losses = [[h["loss"] for h in run["training_state"]["state"]["history"]] for run in (straight, two)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    log = (resumed / "info.log").read_text()
    assert "2 process(es) (the checkpoint's: 1)" in log
    assert "4 tuples per optimiser step (global) = 2 process(es) x 2 tuples per process" in log
    assert "[rank 1]" not in log and (resumed / "test" / "predictions.csv").is_file()


def test_two_ranks_test_py_predicts_what_one_process_does(small_toy_world, trained_toy_checkpoint, tmp_path):
    flags = ["--datasets_folder", str(small_toy_world), "--resume", str(trained_toy_checkpoint), *FAST]
    completed = torchrun("test.py", *flags, "--output_folder", str(tmp_path / "two"), cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' kernels: torchrun gives each process one thread
    try:
        one = test_script.main([*flags, "--output_folder", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    rows = []
    for run in ("one", "two"):
        with open(tmp_path / run / "predictions.csv") as file:
            rows.append(list(csv.DictReader(file)))
    assert rows[0] == rows[1]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["recalls"] == one["recalls"]
    assert two["distributed"] == {"world_size": 2, "images_per_rank": [16, 34], "queries_per_rank": [8, 4]}


def test_a_rank_that_fails_stops_the_run_with_its_error(small_toy_world, tmp_path):
    datasets = tmp_path / "datasets"
    shutil.copytree(small_toy_world, datasets)
    index = load_split(SplitRequest(datasets, "toy_world", "test"))
    broken = index.root / index.database_paths[30]  # in rank 1's batches (16..37 of 38, batch 16)
    broken.write_bytes(broken.read_bytes()[:200])
    completed = torchrun(
        "test.py", "--datasets_folder", str(datasets), "--output_folder", str(tmp_path / "run"), *FAST, cwd=tmp_path
    )
    assert completed.returncode != 0
    assert f"error: cannot decode image {broken}" in completed.stderr  # rank 1's own line
    assert "error: rank 1 failed while extracting database (BadImageError: cannot decode image" in completed.stderr
    assert not (tmp_path / "run" / "results.json").exists()
