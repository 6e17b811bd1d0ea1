"""Evaluation pipeline: recalls, faiss retrieval, the compact store, reranking, and test.py end to end."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

import config
import extraction
import parser as prgs_parser
import reranking
import test as test_script
from config import EvalSettings
from datasets_ws import ImageDataset, SplitRequest, load_split
from feature_store import REFERENCE_BYTES_PER_IMAGE, LocalFeatureStore
from metrics import paired_bootstrap, recall_at_n
from model.network import ModelConfig
from reranking import fused_scores
from retrieval import exact_knn

TOY_ARGS = ["--num_workers", "0", "--infer_batch_size", "16"]


def test_recall_at_n_matches_brute_force():
    rng = np.random.default_rng(0)
    num_queries, num_database, k = 50, 40, 12
    predictions = np.stack([rng.permutation(num_database)[:k] for _ in range(num_queries)])
    positives = [rng.choice(num_database, size=rng.integers(0, 4), replace=False) for _ in range(num_queries)]
    recalls = recall_at_n(predictions, positives, [1, 3, 5, 12, 20])
    for n in (1, 3, 5, 12, 20):
        hits = sum(bool(set(predictions[q, :n]) & set(positives[q])) for q in range(num_queries))
        assert recalls[n] == pytest.approx(100.0 * hits / num_queries)


def test_faiss_top_k_equals_numpy_argsort():
    rng = np.random.default_rng(1)
    database = rng.standard_normal((300, 32)).astype(np.float32)
    queries = rng.standard_normal((20, 32)).astype(np.float32)
    distances, predictions = exact_knn(database, queries, 25)
    squared = ((queries[:, None, :] - database[None]) ** 2).sum(-1)
    assert np.array_equal(predictions, np.argsort(squared, axis=1)[:, :25])
    np.testing.assert_allclose(distances, np.sort(squared, axis=1)[:, :25], rtol=1e-4)
    with pytest.raises(ValueError, match="k must be in"):
        exact_knn(database, queries, 301)


def test_fusion_weight_zero_is_the_reranker_alone():
    probabilities = np.array([[0.9, 0.1]])
    distances = np.array([[1.5, 0.1]])
    assert np.array_equal(fused_scores(probabilities, distances, 0.0), probabilities)
    assert fused_scores(probabilities, distances, 1.0)[0, 1] > fused_scores(probabilities, distances, 1.0)[0, 0]


def _nodes(seed, batch=3, grid=(6, 8), local_dim=5, num_kept=40):
    generator = torch.Generator().manual_seed(seed)
    from model.local_features import build_nodes

    descriptors = torch.randn(batch, grid[0] * grid[1], local_dim, generator=generator)
    attention = torch.rand(batch, grid[0] * grid[1], generator=generator)
    return build_nodes(descriptors, attention, grid, (grid[0] * 16, grid[1] * 16), 16, num_kept)


def test_store_round_trip_rebuilds_the_reranker_input(tmp_path):
    nodes = torch.cat([_nodes(0), _nodes(1)])  # 6 images, written out of order
    store = LocalFeatureStore.create(tmp_path / "store", 6, (6, 8), (96, 128), 16, num_kept=40, local_dim=5)
    store.write([3, 4, 5], nodes[3:])
    store.write([0, 1, 2], nodes[:3])
    store.close()
    reopened = LocalFeatureStore.open(tmp_path / "store")
    rebuilt = reopened.read([5, 0, 3, 3])
    expected = nodes[[5, 0, 3, 3]]
    assert torch.equal(rebuilt == 0, expected == 0)  # zeroed rows restored exactly
    assert torch.equal(rebuilt[..., :2], expected[..., :2])  # coordinates recomputed exactly
    torch.testing.assert_close(rebuilt, expected.half().float(), rtol=0, atol=0)  # the rest: float16 rounding
    assert reopened.bytes_per_image == 40 * 6 * 2 + 40 * 2


def test_store_size_at_the_reference_settings(tmp_path):
    store = LocalFeatureStore.create(tmp_path / "s", 1, (30, 40), (480, 640), 16, num_kept=1000, local_dim=128)
    assert store.bytes_per_image == 260_000
    assert store.bytes_per_image <= 0.45 * REFERENCE_BYTES_PER_IMAGE
    assert (tmp_path / "s" / "local_features.f16").stat().st_size == 258_000


def test_store_refuses_incomplete_writes_and_wrong_shapes(tmp_path):
    store = LocalFeatureStore.create(tmp_path / "s", 3, (6, 8), (96, 128), 16, num_kept=40, local_dim=5)
    with pytest.raises(ValueError, match="do not fit the store"):
        store.write([0], torch.zeros(1, 10, 8))
    store.write([0, 1], _nodes(0, batch=2))
    with pytest.raises(RuntimeError, match="1 images were never written"):
        store.close()
    with pytest.raises(FileNotFoundError, match="not a complete local-feature store"):
        LocalFeatureStore.open(tmp_path / "s")


class _InMemoryNodes:
    """The store's interface over float32 nodes held in memory (no float16 rounding)."""

    content = "nodes"

    def __init__(self, nodes: torch.Tensor):
        self.nodes = nodes

    def read_compact(self, indices):
        return self.nodes[torch.as_tensor(np.asarray(indices))], None

    def expand(self, nodes, positions, device="cpu"):
        return nodes.to(device)


@pytest.mark.parametrize("store_dtype, score_atol", [("float32", 1e-5), ("float16", 2e-2)])
def test_reranked_order_from_the_store_equals_float32_in_memory(
    small_toy_world, trained_toy_checkpoint, tmp_path, store_dtype, score_atol
):
    """A float32 store gives the in-memory scores; a float16 one (the default) the same order, with scores that move
    by up to about 1e-2 where a trained reranker is steep (float16 keeps 11 bits of each node feature)."""
    from model.checkpoint import build_model

    model, _ = build_model(ModelConfig(), resume=trained_toy_checkpoint)
    model.eval()
    index = load_split(SplitRequest(small_toy_world, "toy_world", "test"))
    settings = EvalSettings(
        image_size=(144, 192),
        device=torch.device("cpu"),
        infer_batch_size=16,
        num_workers=0,
        rerank_top=10,
        rerank_batch_size=4,
        store_dtype=store_dtype,
    )
    descriptors, store, _ = extraction.extract_features(model, index, settings, tmp_path / "store")
    with torch.no_grad():
        images = torch.stack([ImageDataset(index, (144, 192))[i][0] for i in range(len(index))])
        global_in_memory, nodes_in_memory = model(images)
    np.testing.assert_allclose(descriptors, global_in_memory.numpy(), atol=1e-5)
    distances, predictions = exact_knn(descriptors[: index.database_num], descriptors[index.database_num :], 10)
    from_store, store_scores, _ = reranking.rerank(model, store, predictions, distances, index.database_num, settings)
    in_memory, memory_scores, _ = reranking.rerank(
        model, _InMemoryNodes(nodes_in_memory), predictions, distances, index.database_num, settings
    )
    assert np.array_equal(from_store, in_memory)
    np.testing.assert_allclose(store_scores, memory_scores, atol=score_atol)
    assert not np.array_equal(from_store, predictions)  # the reranker did re-sort
    assert (memory_scores.max(1) - memory_scores.min(1)).mean() > 0.05  # a trained reranker: scores that differ


@pytest.mark.parametrize("store_dtype, score_atol", [("float32", 5e-3), ("float16", 2e-2)])
def test_precomputed_stage0_gives_the_plain_order(
    small_toy_world, trained_toy_checkpoint, tmp_path, store_dtype, score_atol
):
    """Kernel stage0 (the stage-0 self graph computed at extraction, stored) reranks the trained toy model's
    candidates in the order of the plain path on float32 nodes in memory."""
    from model.checkpoint import build_model

    model, _ = build_model(ModelConfig(), resume=trained_toy_checkpoint)
    index = load_split(SplitRequest(small_toy_world, "toy_world", "test"))
    settings = EvalSettings(
        image_size=(144, 192), device=torch.device("cpu"), infer_batch_size=16, num_workers=0, rerank_top=10,
        rerank_batch_size=4, rerank_kernel="stage0", store_dtype=store_dtype, store_tier="disk",
    )  # fmt: skip
    descriptors, store, timings = extraction.extract_features(model.eval(), index, settings, tmp_path / "store")
    assert store.content == "stage0" and timings["store_write_ms_per_image_database"] > 0
    with torch.no_grad():
        images = torch.stack([ImageDataset(index, (144, 192))[i][0] for i in range(len(index))])
        _, nodes_in_memory = model(images)
    distances, predictions = exact_knn(descriptors[: index.database_num], descriptors[index.database_num :], 10)
    stage0, stage0_scores, _ = reranking.rerank(model, store, predictions, distances, index.database_num, settings)
    plain, plain_scores, _ = reranking.rerank(
        model, _InMemoryNodes(nodes_in_memory), predictions, distances, index.database_num,
        dataclasses.replace(settings, rerank_kernel="plain"),
    )  # fmt: skip
    assert np.array_equal(stage0, plain)
    # float32 rounding differs from the plain path's: distances between near-identical nodes are square roots of
    # rounding noise, about sqrt(eps) x |node| (measured: 1.4e-3 with a float32 store, 5.3e-3 with float16)
    np.testing.assert_allclose(stage0_scores, plain_scores, atol=score_atol)


def test_test_py_end_to_end_on_the_toy_world(small_toy_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = test_script.main(
        [
            "--datasets_folder",
            str(small_toy_world),
            "--num_preds_to_save",
            "3",
            "--recall_values",
            "1",
            "5",
            "50",
            *TOY_ARGS,
        ]
    )
    run_folder = next((tmp_path / "logs" / "test").iterdir())
    on_disk = json.loads((run_folder / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["dataset"]["database_num"] == 38 and on_disk["dataset"]["queries_num"] == 12
    assert set(on_disk["recalls"]["global"]) == {"R@1", "R@5", "R@50"}
    assert on_disk["recalls"]["global"]["R@50"] == 100.0  # clamped to the 38-image database
    assert on_disk["rerank_top"] == 20
    for key in (
        "extraction_ms_per_image_database",
        "extraction_ms_per_image_queries",
        "retrieval_ms_per_query",
        "rerank_ms_per_query",
        "rerank_forward_ms_per_query",
    ):
        assert on_disk["timings"][key] > 0
    # the CPU default: stage-0 rows (90 kept + 1 shared, 3 + 32 channels, float16) held in RAM
    assert on_disk["store"]["bytes_per_image"] == (90 + 1) * (3 + 32) * 2 + 90 * 2  # toy preset: local_dim 32
    assert on_disk["store"]["tier"] == "host" and on_disk["configuration"]["rerank_kernel"] == "auto"
    resolved = on_disk["resolved"]  # what "auto" resolved to: float32 on any CPU today
    assert resolved["rerank_kernel"] == "stage0" and resolved["preprocessing"] == resolved["image_decoder"] == "pil"
    assert {k: v for k, v in resolved["precision"].items() if k != "reason"} == {
        "requested": "auto",
        "extraction": "fp32",
        "reranking": "fp32",
    }
    assert resolved["precision"]["reason"] and isinstance(resolved["cpu_native_bf16"], bool)
    assert (run_folder / "info.log").is_file() and (run_folder / "debug.log").is_file()
    assert not (run_folder / "local_features").exists()
    with open(run_folder / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * 12 and {r["ranking"] for r in rows} == {"global", "reranked"}
    assert all(len(r["database_paths"].split("|")) == 38 for r in rows)
    assert len(list((run_folder / "predictions").glob("*.png"))) == 12


def test_rerank_top_is_clamped_and_never_leaks_minus_one(small_toy_world, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    test_script.main(
        ["--datasets_folder", str(small_toy_world), "--rerank_top", "500", "--recall_values", "1", *TOY_ARGS]
    )
    assert "--rerank_top 500 is larger than the database (38 images): using 38" in caplog.text
    run_folder = next((tmp_path / "logs" / "test").iterdir())
    with open(run_folder / "predictions.csv") as file:
        for row in csv.DictReader(file):
            assert "-1" not in row["database_paths"].split("|")


def test_skip_bad_images_is_reported_in_results(small_toy_world, tmp_path, monkeypatch):
    import shutil

    datasets = tmp_path / "datasets"
    shutil.copytree(small_toy_world, datasets)
    database = sorted((datasets / "toy_world/images/test/database").glob("*.jpg"))
    database[0].write_bytes(database[0].read_bytes()[:200])  # truncated JPEG
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match=f"cannot decode image .*{database[0].name}"):
        test_script.main(["--datasets_folder", str(datasets), *TOY_ARGS])
    results = test_script.main(["--datasets_folder", str(datasets), "--skip_bad_images", *TOY_ARGS])
    assert results["dataset"]["database_num"] == 37
    assert [e["path"] for e in results["dataset"]["excluded_images"]] == [f"database/{database[0].name}"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rerank_top", "0"], "expected a positive integer"),
        (["--rerank_fusion", "1.5"], r"expected a number in \[0, 1\]"),
        (["--resize", "100", "100"], "image size 100x100"),
        (["--resume", "no_such_file.pth"], "--resume no_such_file.pth: file not found"),
        (["--num_kept_nodes", "5000"], r"num_kept_nodes must be in \[1, 108\]"),
    ],
)
def test_bad_flags_are_refused_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit):
        test_script.main(flags)
    assert __import__("re").search(message, capsys.readouterr().err)


def test_missing_dataset_and_incompatible_checkpoint_are_explained(tmp_path, monkeypatch):
    from places.index import DatasetError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="dataset folder .*pitts30k not found"):
        test_script.main(["--dataset_name", "pitts30k", "--datasets_folder", str(tmp_path), *TOY_ARGS])
    bad = tmp_path / "bad.pth"
    torch.save({"model_state_dict": {"module.something": torch.zeros(1)}}, bad)
    with pytest.raises(SystemExit):
        test_script.main(["--resume", str(bad), *TOY_ARGS])


def test_scripts_print_dataset_errors_as_one_line(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    completed = subprocess.run(
        [
            sys.executable,
            str(repo / "test.py"),
            "--dataset_name",
            "pitts30k",
            "--datasets_folder",
            str(tmp_path / "nowhere"),
            "--output_folder",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert completed.returncode == 2
    assert "error: datasets folder" in completed.stderr and "Traceback" not in completed.stderr


def test_paired_bootstrap_gives_the_difference_and_a_sensible_interval():
    rng = np.random.default_rng(0)
    same = rng.random(300) < 0.5
    assert paired_bootstrap(same, same) == (0.0, 0.0, 0.0)
    points, low, high = paired_bootstrap(np.ones(300, bool), np.zeros(300, bool))
    assert (points, low, high) == (100.0, 100.0, 100.0)
    # 60 queries gained, 15 lost of 300: +15 points; standard error sqrt(75) / 300 = 2.9 points -> CI about +-5.7
    a, b = np.zeros(300, bool), np.zeros(300, bool)
    a[:60], b[60:75] = True, True
    points, low, high = paired_bootstrap(a, b)
    assert points == pytest.approx(15.0) and low < points < high
    assert 9.0 < low < 10.5 and 19.5 < high < 21.0
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap(a, b[:10])


@pytest.mark.parametrize("build", ["test_parser", "train_parser"])
def test_the_settings_objects_are_built_from_flags_of_the_same_names(build):
    """config.eval_settings and config.output_options take each field from the flag of the same name: every field
    but the derived ones is a flag of both evaluating entry points (test.py's alone has --rerank_pictures)."""
    flags = {action.dest for action in getattr(prgs_parser, build)()._actions}
    eval_fields = {f.name for f in dataclasses.fields(EvalSettings)} - set(config._DERIVED_EVAL_FIELDS)
    assert eval_fields <= flags and "resize" in flags
    output_fields = {f.name for f in dataclasses.fields(config.OutputOptions)}
    assert output_fields - {"rerank_pictures"} <= flags
    assert ("rerank_pictures" in flags) == (build == "test_parser")
