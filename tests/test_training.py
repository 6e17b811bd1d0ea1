"""Training: the hard-negative file, negative sampling, exact resume, early stopping, and that the loss falls."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from short_runs import FAST, REPO_ROOT, SHORT_TRAINING, TRAIN, copy_run, resume_argv, run_script, snapshot, with_flag

import evaluation
import pre_compute_mining
import runs
import train_reranking
import training
import training_state
from config import RESUME_FREE_GROUPS, EvalSettings, resume_free_flags
from datasets_ws import SplitRequest, load_split
from mining import (
    MiningFileError,
    TupleMiner,
    dataset_fingerprints,
    hard_negatives_from_descriptors,
    load_hard_negatives,
    save_hard_negatives,
)
from parser import parse_train_args, train_parser
from places.index import PlaceIndex


def _toy_index(num_database=30, num_queries=12, seed=0, prefix="q") -> PlaceIndex:
    """A synthetic training split on a line: database every 5 m, queries near random database images."""
    rng = np.random.default_rng(seed)
    database_utms = np.stack([np.arange(num_database) * 5.0, np.zeros(num_database)], axis=1)
    queries_utms = database_utms[rng.choice(num_database, num_queries)] + [[1.0, 0.0]]
    from places.index import positives_within_radius

    return PlaceIndex(
        name="synthetic/train",
        root=".",
        database_paths=[f"d{i}.jpg" for i in range(num_database)],
        queries_paths=[f"{prefix}{i}.jpg" for i in range(num_queries)],
        database_utms=database_utms,
        queries_utms=queries_utms,
        soft_positives_per_query=positives_within_radius(database_utms, queries_utms, 25.0),
        hard_positives_per_query=positives_within_radius(database_utms, queries_utms, 10.0),
    )


def test_hard_negatives_exclude_soft_positives_and_pad_with_minus_one():
    index = _toy_index()
    rng = np.random.default_rng(1)
    descriptors = rng.standard_normal((len(index), 8)).astype(np.float32)
    negatives = hard_negatives_from_descriptors(
        descriptors[:30], descriptors[30:], index.soft_positives_per_query, num_negatives=28, chunk_size=5
    )
    assert negatives.shape == (12, 28)
    for query, row in enumerate(negatives):
        valid = row[row >= 0]
        assert not np.isin(valid, index.soft_positives_per_query[query]).any()
        assert len(valid) == 30 - len(index.soft_positives_per_query[query])  # the rest is -1 padding
        distances = ((descriptors[valid] - descriptors[30 + query]) ** 2).sum(1)
        assert np.all(np.diff(distances) >= -1e-5)  # in similarity order


def test_hard_negative_file_round_trip_and_staleness(tmp_path):
    index = _toy_index()
    negatives = np.tile(np.arange(20), (12, 1))
    path = tmp_path / "hn.npz"
    save_hard_negatives(path, negatives, {"dataset": index.name, **dataset_fingerprints(index)})
    loaded, metadata = load_hard_negatives(path, index, min_columns=10, rebuild_hint="python pre_compute_mining.py")
    assert np.array_equal(loaded, negatives) and metadata["dataset"] == "synthetic/train"
    assert metadata["format"] == "prgs-hard-negatives" and "created" in metadata

    other = _toy_index(prefix="other")  # other query images: the file is stale for it
    with pytest.raises(MiningFileError, match=r"mined for another dataset.*Rebuild it with: python pre_compute"):
        load_hard_negatives(path, other, 10, "python pre_compute_mining.py")
    with pytest.raises(MiningFileError, match="--neg_hardness asks for 50"):
        load_hard_negatives(path, index, 50, "hint")
    with pytest.raises(MiningFileError, match="not found"):
        load_hard_negatives(tmp_path / "missing.npz", index, 10, "hint")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(MiningFileError, match="cannot read"):
        load_hard_negatives(tmp_path / "bad.npz", index, 10, "hint")


@pytest.mark.parametrize("mode", ["global", "partial", "full", "random"])
def test_negatives_are_never_minus_one_nor_soft_positives(mode):
    index = _toy_index()
    rng = np.random.default_rng(0)
    # a hostile hard-negative list: short rows padded with -1, and soft positives listed first
    hard = np.full((12, 12), -1, dtype=np.int64)
    for query in range(12):
        listed = np.concatenate([index.soft_positives_per_query[query], rng.permutation(30)])[:6]
        hard[query, :6] = listed
    miner = TupleMiner(
        index,
        mode,
        negs_num_per_query=5,
        neg_hardness=12,
        neg_samples_num=10,
        hard_negatives=hard if mode == "global" else None,
    )
    descriptors = rng.standard_normal((len(index), 4)).astype(np.float32)
    for _ in range(200):
        queries = rng.choice(12, 6, replace=False)
        tuples = miner.mine(queries, rng, lambda ids: descriptors[ids], global_model_frozen=True)
        for query, positive, negatives in zip(tuples.queries, tuples.positives, tuples.negatives):
            assert len(negatives) == 5 and len(set(negatives)) == 5
            assert (negatives >= 0).all() and (negatives < 30).all()
            assert not np.isin(negatives, index.soft_positives_per_query[query]).any()
            assert positive in index.hard_positives_per_query[query]


def _train(datasets, output, *extra):
    return train_reranking.main(
        [
            "--datasets_folder",
            str(datasets),
            "--output_folder",
            str(output),
            *SHORT_TRAINING,
            *FAST,
            *extra,
        ]
    )


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(small_toy_world, tmp_path):
    stage = [
        "--train_stage",
        "full",
        "--epochs_num",
        "2",
        "--patience",
        "5",
        "--mining",
        "partial",
        "--backbone_weights",
        "none",
    ]
    _train(small_toy_world, tmp_path / "straight", *stage)
    _train(small_toy_world, tmp_path / "interrupted", *stage, "--max_steps", "3")
    first = torch.load(tmp_path / "interrupted" / "last.pth", weights_only=True)
    assert first["training_state"]["state"]["global_step"] == 3
    assert first["training_state"]["state"]["tuples"] is not None  # stopped inside a mining round
    results = _train(
        small_toy_world, tmp_path / "resumed", *stage, "--resume", str(tmp_path / "interrupted" / "last.pth")
    )
    straight = torch.load(tmp_path / "straight" / "last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)
    assert resumed["training_state"]["state"]["global_step"] == straight["training_state"]["state"]["global_step"] == 8
    for key, value in straight["model_state_dict"].items():
        assert torch.equal(resumed["model_state_dict"][key], value), key
    straight_history = straight["training_state"]["state"]["history"]
    assert [h["loss"] for h in results["history"]] == [h["loss"] for h in straight_history]


def test_early_stopping_after_patience_epochs(small_toy_world, tmp_path, monkeypatch):
    from evaluation import Evaluation

    calls = []

    def constant_evaluation(model, index, settings, work_folder, with_rerank=True, source=None):
        calls.append(index.name)
        predictions = np.zeros((index.queries_num, 1), dtype=np.int64)
        recalls = {n: 50.0 for n in settings.recall_values}
        return Evaluation(
            predictions,
            predictions.astype(np.float32),
            predictions,
            np.zeros((index.queries_num, 1), np.float32),
            1,
            recalls,
            recalls,
            {},
            0,
        )

    monkeypatch.setattr(training, "evaluate", constant_evaluation)
    results = _train(
        small_toy_world,
        tmp_path / "run",
        "--train_stage",
        "reranker",
        "--epochs_num",
        "10",
        "--patience",
        "2",
        "--cache_frozen_backbone",
        "--backbone_weights",
        "none",
    )
    assert results["stopped"] == "early_stopping"
    assert results["epochs_trained"] == 3  # epoch 0 improves on nothing, then 2 epochs without improvement
    assert results["best"]["epoch"] == 0
    assert calls.count("toy_world/val") == 3


def test_loss_falls_within_a_few_dozen_steps(small_toy_world, tmp_path):
    """The global fit of the toy-world demo (its first step): the triplet loss falls within 32 steps."""
    results = _train(
        small_toy_world,
        tmp_path / "run",
        "--train_stage",
        "global",
        "--epochs_num",
        "8",
        "--patience",
        "8",
        "--backbone_weights",
        "none",
        "--queries_per_epoch",
        "16",
        "--cache_refresh_rate",
        "16",
        "--mining",
        "random",
    )
    losses = [h["loss"] for h in results["history"]]
    assert results["global_step"] == 32
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses


def test_training_outputs_and_reference_resume_message(small_toy_world, tmp_path, caplog):
    _train(
        small_toy_world,
        tmp_path / "run",
        "--train_stage",
        "global",
        "--epochs_num",
        "1",
        "--backbone_weights",
        "none",
        "--test_before_training",
    )
    folder = tmp_path / "run"
    for name in ("info.log", "debug.log", "last.pth", "best.pth", "training_curves.png", "results.json"):
        assert (folder / name).is_file(), name
    on_disk = json.loads((folder / "results.json").read_text())
    assert set(on_disk["test_before_training"]) == {"global", "reranked"} and on_disk["test"]["global"]["R@1"] >= 0
    # what the test ran where the flags said "auto", as its own results.json records it
    assert on_disk["resolved"]["precision"]["requested"] == "auto" and on_disk["resolved"]["rerank_kernel"] != "auto"
    assert on_disk["resolved"] == json.loads((folder / "test" / "results.json").read_text())["resolved"]
    best = torch.load(folder / "best.pth", weights_only=True)
    assert "training_state" not in best and best["model_config"]["backbone"] == "deit_micro"
    # weights-only resume of a checkpoint from another stage
    _train(
        small_toy_world,
        tmp_path / "next",
        "--train_stage",
        "reranker",
        "--epochs_num",
        "1",
        "--resume",
        str(folder / "last.pth"),
        "--cache_frozen_backbone",
    )
    assert "initialises the weights only" in caplog.text


def test_pre_compute_mining_writes_a_file_training_accepts(small_toy_world, tmp_path):
    output = tmp_path / "hn.npz"
    pre_compute_mining.main(
        [
            "--datasets_folder",
            str(small_toy_world),
            "--output",
            str(output),
            "--output_folder",
            str(tmp_path / "mining"),
            "--num_hard_negatives",
            "20",
            "--num_workers",
            "0",
            "--backbone_weights",
            "none",
        ]
    )
    index = load_split(SplitRequest(small_toy_world, "toy_world", "train"))
    negatives, metadata = load_hard_negatives(output, index, 20, "hint")
    assert negatives.shape == (index.queries_num, 20)
    assert metadata["num_hard_negatives"] == 20 and metadata["queries_num"] == index.queries_num
    _train(
        small_toy_world,
        tmp_path / "run",
        "--train_stage",
        "reranker",
        "--epochs_num",
        "1",
        "--mining",
        "global",
        "--hard_negatives",
        str(output),
        "--neg_hardness",
        "10",
        "--cache_frozen_backbone",
        "--backbone_weights",
        "none",
    )


def test_training_flag_validation(capsys):
    for flags, message in (
        (["--queries_per_epoch", "10", "--cache_refresh_rate", "4"], "must be a multiple"),
        (["--mining", "global"], "needs --hard_negatives"),
        (["--train_stage", "full", "--cache_frozen_backbone"], "needs --train_stage reranker"),
    ):
        with pytest.raises(SystemExit):
            train_reranking.main(flags)
        assert message in capsys.readouterr().err


def test_a_resume_that_changes_only_how_the_run_executes_is_the_same_run():
    """Flags of the runtime, speed, output and picture groups may change on a resume without the run being reported
    as another; a model or data flag that changes is still reported."""
    saved = parse_train_args([])
    state = {"args": runs.plain_args(saved), "training_state": {"device": "cpu"}}
    cpu = torch.device("cpu")
    execution = ["--dist_timeout", "5", "--num_queries_to_save", "3", "--rerank_cuda_graphs", "--store_tier", "host"]
    assert training_state.resume_differences(state, parse_train_args(execution), cpu) == []
    for flags, expected in (
        (["--resize", "160", "224"], "--resize 160 224 (the checkpoint's: 144 192)"),
        (["--local_head_init", "reference"], "--local_head_init reference (the checkpoint's: xavier)"),
        (["--val_positive_dist_threshold", "20"], "--val_positive_dist_threshold 20.0 (the checkpoint's: 25.0)"),
        (["--skip_bad_images"], "--skip_bad_images True (the checkpoint's: False)"),
    ):
        assert training_state.resume_differences(state, parse_train_args([*flags, *execution]), cpu) == [expected]


def test_the_resume_free_groups_are_groups_of_the_train_parser():
    parser = train_parser()
    assert set(RESUME_FREE_GROUPS) <= {group.title for group in parser._action_groups}
    free = resume_free_flags(parser)
    assert {"dist_timeout", "num_queries_to_save", "rerank_cuda_graphs", "store_tier", "backbone"} <= free
    assert not free & {"resize", "dataset_name", "train_batch_size", "lr", "precision", "seed", "rerank_top"}


# ----------------------------------------------------------------------------------------------------------------
# Training


def test_resuming_into_a_new_folder_takes_its_best_along_and_tests_it(
    small_toy_world, interrupted_run, tmp_path, caplog
):
    before = snapshot(interrupted_run)
    folder = tmp_path / "resumed"
    results = train_reranking.main(resume_argv(small_toy_world, interrupted_run, folder))
    assert "exactly: epoch 1, round 0, step 1" in caplog.text and "NOT exactly" not in caplog.text
    assert "copied best.pth (epoch 0)" in caplog.text
    assert (folder / "best.pth").is_file() and results["test"]["reranked"]["R@1"] >= 0
    assert json.loads((folder / "results.json").read_text())["stopped"] == "epochs_num"
    assert snapshot(interrupted_run) == before  # the interrupted run is untouched


def test_resuming_with_another_batch_size_says_what_differs(small_toy_world, interrupted_run, tmp_path, caplog):
    flags = [*with_flag(TRAIN, "--train_batch_size", "2"), "--max_steps", "7"]
    train_reranking.main(resume_argv(small_toy_world, interrupted_run, tmp_path / "resumed", flags))
    expected = "NOT exactly as the interrupted run would have continued: --train_batch_size 2 (the checkpoint's: 4)"
    assert expected in caplog.text
    state = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)["training_state"]["state"]
    # 1 step of 4 tuples before, 2 steps of 2 after: the round's 8 tuples, none skipped or repeated
    assert state["global_step"] == 7 and state["tuples_done"] == 8


def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoints(small_toy_world, interrupted_run, tmp_path, capsys):
    run = copy_run(interrupted_run, tmp_path)
    before = snapshot(run)
    argv = resume_argv(small_toy_world, run, run, with_flag(TRAIN, "--lr", "1e30"))
    status, line = run_script(train_reranking.main, argv, capsys)
    assert status == 2 and line.startswith("error: training diverged at epoch 1, step")
    assert "lower --lr or set --grad_clip" in line and f"kept in {run}: best.pth (epoch 0), last.pth (epoch 1" in line
    for name in ("last.pth", "best.pth"):
        assert snapshot(run)[name] == before[name]
        weights = torch.load(run / name, weights_only=True)["model_state_dict"]
        assert all(torch.isfinite(value).all() for value in weights.values())
    assert snapshot(run)["results.json"] == before["results.json"] and not (run / "work").exists()
    status, line = run_script(train_reranking.main, ["--lr", "inf", *FAST], capsys)
    assert status == 2 and "expected a finite positive number, got inf" in line


def test_more_negatives_than_the_database_has_is_one_line(small_toy_world, tmp_path, capsys):
    folder = tmp_path / "run"
    argv = ["--datasets_folder", str(small_toy_world), "--output_folder", str(folder), *TRAIN, *FAST]
    status, line = run_script(train_reranking.main, [*argv, "--negs_num_per_query", "500"], capsys)
    assert status == 2 and "--negs_num_per_query 500 is more than the training split" in line
    assert "Use --negs_num_per_query" in line and not folder.exists()
    status, line = run_script(train_reranking.main, [*argv, "--train_batch_size", "9"], capsys)
    assert status == 2 and "--train_batch_size 9 is larger than a mining round of 8 queries" in line


def _write_vg_image(folder: Path, east: float, north: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (90, 90, 90)).save(folder / f"@{east}@{north}@17@T@0@0@x@0@0@0@0@0@2020@x@.jpg")


def test_a_training_split_without_any_positive_is_one_line(tmp_path, capsys):
    for split in ("train", "val", "test"):
        for i in range(4):
            _write_vg_image(tmp_path / "far" / "images" / split / "database", 10.0 * i, 0.0)
            _write_vg_image(tmp_path / "far" / "images" / split / "queries", 5000.0 + i, 0.0)
    argv = ["--datasets_folder", str(tmp_path), "--dataset_name", "far", "--output_folder", str(tmp_path / "run")]
    argv += ["--backbone", "deit_micro", "--resize", "144", "192", "--local_dim", "32", *TRAIN, *FAST]
    status, line = run_script(train_reranking.main, argv, capsys)
    assert (
        status == 2 and "the training split < far/train: 4 database, 0 queries > has no query with a positive" in line
    )
    assert not (tmp_path / "run").exists()


def test_the_demo_reuses_the_global_model_only_when_that_stage_finished(tmp_path):
    shutil.copy(REPO_ROOT / "train_reranking.sh", tmp_path)
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    stub.chmod(0o755)
    global_model = tmp_path / "logs" / "toy_world_demo" / "global_model"
    global_model.mkdir(parents=True)

    def demo_stage_one() -> str:
        """The first command train_reranking.sh runs after making the world."""
        calls.unlink(missing_ok=True)
        subprocess.run(
            ["bash", str(tmp_path / "train_reranking.sh")], env={**os.environ, "PYTHON": str(stub)}, check=True
        )
        lines = calls.read_text().splitlines()
        assert lines[0].startswith("-m places.toy_world --datasets_folder data --seed 0")
        return lines[1]

    (global_model / "best.pth").write_bytes(b"from an interrupted first epoch")
    (global_model / "last.pth").write_bytes(b"the interrupted run's state")
    first = demo_stage_one()
    assert "--train_stage global" in first and "--resume logs/toy_world_demo/global_model/last.pth" in first
    (global_model / "results.json").write_text(json.dumps({"stopped": "max_steps"}))
    assert "--train_stage global" in demo_stage_one()
    (global_model / "results.json").write_text(json.dumps({"stopped": "early_stopping"}))
    assert "pre_compute_mining.py" in demo_stage_one()  # finished: reused
    manifest = tmp_path / "data" / "toy_world" / "toy_world.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    later = (global_model / "results.json").stat().st_mtime + 10
    os.utime(manifest, (later, later))  # a world made after the fit (e.g. by a newer generator): fit again
    stage_one = demo_stage_one()
    assert "--train_stage global" in stage_one and "--resume" not in stage_one
    assert not (global_model / "last.pth").exists()


def test_training_queries_come_in_random_order_seeded_and_resumable(interrupted_run):
    state = torch.load(interrupted_run / "last.pth", weights_only=True)["training_state"]["state"]
    queries = state["tuples"]["queries"].numpy()
    training_queries = 16  # of the small toy world; a round draws 8 of them
    expected = np.random.default_rng([3, state["epoch"], state["round"]]).choice(training_queries, 8, replace=False)
    np.testing.assert_array_equal(queries, expected)  # the seeded draw, as drawn: not sorted
    assert not np.array_equal(queries, np.sort(queries))


def test_an_empty_split_is_refused_before_evaluating(small_toy_world, tmp_path):
    index = load_split(SplitRequest(small_toy_world, "toy_world", "test"))
    from places.index import DatasetError, subset_index

    empty = subset_index(index, np.arange(index.database_num), np.empty(0, dtype=np.int64))
    with pytest.raises(DatasetError, match="has no queries or no database images"):
        evaluation.evaluate(None, empty, EvalSettings((144, 192), torch.device("cpu")), tmp_path)
