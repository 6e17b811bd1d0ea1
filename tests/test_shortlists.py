"""Reranking anyone's shortlist, end to end: test.py with --global_model (a local hub folder written here, never the
network) and with --candidates, on the toy world and on plain photo folders; one configuration on several datasets
(--datasets); mining and training with another retriever; the flags that cannot go together."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from short_runs import SHORT_TRAINING

import pre_compute_mining
import test as test_script
import train_reranking
from config import DatasetSplit, parse_datasets
from datasets_ws import SplitRequest, load_split
from extraction import ExtractionSettings, global_descriptors
from mining import load_hard_negatives
from model.checkpoint import build_model
from model.network import ModelConfig
from retrieval import exact_knn
from retrievers import GlobalRetriever, global_model_spec
from suite import benchmark_table, mean_recalls

# an untrained network of the toy preset (seed 42): its reranker still re-sorts, the same way in every run
FAST = [
    "--num_workers",
    "0",
    "--infer_batch_size",
    "25",
    "--recall_values",
    "1",
    "5",
    "10",
    "--backbone_weights",
    "none",
]

HUBCONF = '''
dependencies = ["torch"]

import torch


class Colours(torch.nn.Module):
    """A retriever that needs no training: a fixed random projection of the 4x4-pooled colours."""

    def __init__(self, dim):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.projection = torch.nn.Parameter(torch.randn(3 * 4 * 4, dim, generator=generator))

    def forward(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1) @ self.projection


def colours(dim=16):
    return Colours(dim)
'''


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("colour_retriever")
    (folder / "hubconf.py").write_text(HUBCONF)
    return folder


def _predictions(folder: Path) -> dict[str, list[list[str]]]:
    """predictions.csv's rows by ranking: per query, its ranked database paths."""
    rows = {"global": [], "reranked": []}
    with open(folder / "predictions.csv", newline="") as file:
        for row in csv.DictReader(file):
            rows[row["ranking"]].append(row["database_paths"].split("|"))
    return rows


@pytest.fixture(scope="module")
def colour_run(small_toy_world, hub_folder, tmp_path_factory) -> tuple[dict, Path]:
    """test.py on the small toy world's test split, the shortlist from the colour retriever."""
    output = tmp_path_factory.mktemp("runs") / "colours"
    results = test_script.main(
        ["--datasets_folder", str(small_toy_world)]
        + ["--global_model", f"{hub_folder}:colours", "--global_model_kwargs", "dim=24"]
        + ["--output_folder", str(output), *FAST]
    )
    return results, output


def test_a_global_model_from_a_local_hub_folder_makes_the_shortlist_the_reranker_sorts(
    colour_run, small_toy_world, hub_folder
):
    results, output = colour_run
    record = results["retrieval"]["shortlist"]["global_model"]
    assert record["source_kind"] == "local" and record["entry"] == "colours" and record["kwargs"] == {"dim": 24}
    # the global order is the faiss search of the retriever's descriptors, fed the loop's pixels
    index = load_split(SplitRequest(small_toy_world, "toy_world", "test"))
    retriever = GlobalRetriever.from_spec(global_model_spec(f"{hub_folder}:colours", "dim=24"), "cpu")
    model, _ = build_model(ModelConfig(backbone="deit_micro", image_size=(144, 192), local_dim=32))
    loop = ExtractionSettings((144, 192), retriever.device, 25, 0)
    descriptors = global_descriptors(model, index, np.arange(len(index)), loop, retriever=retriever)
    assert descriptors.shape == (len(index), 24)
    _, expected = exact_knn(descriptors[: index.database_num], descriptors[index.database_num :], 20)
    rows = _predictions(output)
    assert rows["global"] == [[index.database_paths[i] for i in row] for row in expected]
    # the reranker re-sorts the retriever's top 20 (the toy preset's --rerank_top)
    for global_row, reranked_row in zip(rows["global"], rows["reranked"]):
        assert sorted(reranked_row) == sorted(global_row)
    assert results["recalls"]["global"] != results["recalls"]["reranked"]


def test_a_candidates_file_is_reranked_as_the_same_shortlist_searched(colour_run, small_toy_world, tmp_path):
    results, output = colour_run
    again = test_script.main(
        ["--datasets_folder", str(small_toy_world)]
        + ["--candidates", str(output / "predictions.csv"), "--output_folder", str(tmp_path / "file"), *FAST]
    )
    assert _predictions(tmp_path / "file") == _predictions(output)
    assert again["recalls"] == results["recalls"]
    assert again["retrieval"]["index"] == "candidates file"
    assert again["retrieval"]["shortlist"]["candidates"] == str(output / "predictions.csv")


def test_plain_photo_folders_take_a_global_model_and_a_candidates_file(small_toy_world, hub_folder, tmp_path):
    split = small_toy_world / "toy_world" / "images" / "test"
    for part in ("database", "queries"):
        for number, image in enumerate(sorted((split / part).glob("*.jpg"))):
            (tmp_path / "photos" / part).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, tmp_path / "photos" / part / f"IMG_{number:04d}.jpg")  # no coordinates
    folders = [
        "--database_folder",
        str(tmp_path / "photos/database"),
        "--queries_folder",
        str(tmp_path / "photos/queries"),
    ]
    toy_model = ["--backbone", "deit_micro", "--resize", "144", "192", "--local_dim", "32", "--rerank_top", "20"]
    common = [*folders, *toy_model, *FAST]  # folders get the reference's preset: the toy world's model, named
    searched = test_script.main(
        [*common, "--global_model", f"{hub_folder}:colours", "--output_folder", str(tmp_path / "searched")]
    )
    assert searched["recalls"]["global"] is None and searched["retrieval"]["shortlist"]["global_model"]
    plain_csv = tmp_path / "shortlist.csv"  # the plain CSV another tool writes: query, then database paths
    with open(plain_csv, "w", newline="") as file:
        writer = csv.writer(file)
        with open(tmp_path / "searched" / "predictions.csv", newline="") as predictions:
            for row in csv.DictReader(predictions):
                if row["ranking"] == "global":
                    writer.writerow([row["query_path"], *row["database_paths"].split("|")])
    test_script.main([*common, "--candidates", str(plain_csv), "--output_folder", str(tmp_path / "file")])
    assert _predictions(tmp_path / "file") == _predictions(tmp_path / "searched")


def test_one_configuration_on_several_datasets_prints_one_table(small_toy_world, hub_folder, tmp_path):
    vg_copy = tmp_path / "datasets"  # a VG-format dataset of another name: the toy world's val split as its test
    shutil.copytree(small_toy_world / "toy_world" / "images" / "val", vg_copy / "copy" / "images" / "test")
    shutil.copytree(small_toy_world / "toy_world", vg_copy / "toy_world")
    results = test_script.main(
        ["--datasets", "toy_world:val,toy_world:test,copy:test", "--datasets_folder", str(vg_copy)]
        + ["--global_model", f"{hub_folder}:colours"]
        + ["--output_folder", str(tmp_path / "suite"), *FAST]
    )
    folder = tmp_path / "suite"
    assert json.loads((folder / "results.json").read_text()) == json.loads(json.dumps(results))
    assert list(results["datasets"]) == ["toy_world:val", "toy_world:test", "copy:test"]
    for name, row in results["datasets"].items():
        own = json.loads((folder / name.replace(":", "_") / "results.json").read_text())
        assert own["recalls"] == row["recalls"] and own["retrieval"]["shortlist"] == results["shortlist"]
        assert row["ms_per_query"]["total"] > 0 and row["memory"]["peak_host_rss_mb"] > 0
    # the same images under two names give the same numbers
    assert results["datasets"]["copy:test"]["recalls"] == results["datasets"]["toy_world:val"]["recalls"]
    mean_r1 = np.mean([row["recalls"]["reranked"]["R@1"] for row in results["datasets"].values()])
    assert results["mean"]["reranked"]["R@1"] == pytest.approx(mean_r1, abs=1e-4)
    table = (folder / "benchmark.md").read_text().splitlines()
    assert table[0].startswith("| dataset | queries | global R@1 | global R@5 | global R@10 | reranked R@1 |")
    assert [line.split("|")[1].strip() for line in table[2:]] == [
        "toy_world:val",
        "toy_world:test",
        "copy:test",
        "mean",
    ]


def test_a_reranked_recall_past_rerank_top_is_none_in_the_mean_and_a_dash_in_the_table():
    """With --rerank_top 20 a split's reranked R@100 is None (outputs.py); the mean of such a recall is None, and
    the table shows '-' there, instead of failing at the end of a long run."""
    recalls = {
        "global": {"R@1": 20.0, "R@5": 40.0, "R@100": 100.0},
        "reranked": {"R@1": 30.0, "R@5": None, "R@100": None},
    }
    row = {
        "recalls": recalls,
        "queries_num": 10,
        "ms_per_query": dict.fromkeys(("extraction", "search", "rerank", "total"), 1.0),
    }
    row["memory"] = {"peak_host_rss_mb": 1.0, "store_bytes_per_image": 8}
    other = {
        **row,
        "recalls": {"global": {**recalls["global"], "R@1": 40.0}, "reranked": {**recalls["reranked"], "R@1": 50.0}},
    }
    mean = mean_recalls(
        {"a:test": row, "b:test": other, "c:test": {**row, "recalls": {"global": None, "reranked": None}}}
    )
    assert mean == {
        "global": {"R@1": 30.0, "R@5": 40.0, "R@100": 100.0},
        "reranked": {"R@1": 40.0, "R@5": None, "R@100": None},
    }
    table = benchmark_table({"datasets": {"a:test": row, "b:test": other}, "mean": mean})
    assert "| mean |  | 30.00 | 40.00 | 40.00 | - |" in table  # R@1 and R@5 (the table shows up to R@10)


@pytest.mark.slow
def test_mining_and_training_follow_the_global_model(small_toy_world, hub_folder, colour_run, tmp_path):
    """The hard negatives are the retriever's, and training's validation and test rank with its shortlist: the
    final test's global recalls are test.py's with the same retriever, whatever the reranker learnt."""
    retriever = ["--global_model", f"{hub_folder}:colours", "--global_model_kwargs", "dim=24"]
    data = ["--datasets_folder", str(small_toy_world), "--num_workers", "0", "--backbone_weights", "none"]
    output = tmp_path / "hn.npz"
    pre_compute_mining.main(
        [*data, *retriever, "--output", str(output), "--output_folder", str(tmp_path / "mining")]
        + ["--num_hard_negatives", "20"]
    )
    index = load_split(SplitRequest(small_toy_world, "toy_world", "train"))
    _, metadata = load_hard_negatives(output, index, 20, "hint")
    assert metadata["global_model"]["entry"] == "colours" and metadata["global_model"]["kwargs"] == {"dim": 24}
    results = train_reranking.main(
        [*data, *retriever, *SHORT_TRAINING, "--train_stage", "reranker", "--epochs_num", "1", "--mining", "global"]
        + ["--hard_negatives", str(output), "--neg_hardness", "10", "--cache_frozen_backbone"]
        + ["--recall_values", "1", "5", "10", "--output_folder", str(tmp_path / "run")]
    )
    assert results["test"]["global"] == colour_run[0]["recalls"]["global"]


def test_datasets_are_name_split_pairs():
    assert parse_datasets("toy_world:val, pitts30k:test,msls:val") == [
        DatasetSplit("toy_world", "val"),
        DatasetSplit("pitts30k", "test"),
        DatasetSplit("msls", "val"),
    ]
    for text, message in (("pitts30k", "NAME:SPLIT"), ("pitts30k:dev", "NAME:SPLIT"), ("a:val,a:val", "twice")):
        with pytest.raises(ValueError, match=message):
            parse_datasets(text)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--candidates", "c.csv", "--rerank_fusion", "0.5"], "cannot go with --rerank_fusion"),
        (["--candidates", "c.csv", "--global_model", "x:y"], "cannot go with --global_model"),
        (["--candidates", "c.csv", "--faiss_index", "IVF4,Flat"], "cannot go with --faiss_index"),
        (["--candidates", "c.csv", "--datasets", "toy_world:val"], "cannot go with --datasets"),
        (["--candidates", "missing.csv"], "missing.csv: file not found"),
        (["--global_weights", "w.pth"], "needs a --global_model other than prgs"),
        (["--global_model", "nonsense"], "is neither 'prgs', a preset"),
        (["--datasets", "toy_world"], "expected NAME:SPLIT"),
    ],
)
def test_flags_that_cannot_go_together_are_refused(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.csv").write_text("q.jpg,d.jpg\n")
    with pytest.raises(SystemExit):
        test_script.main(flags)
    assert message in capsys.readouterr().err


def test_training_takes_a_global_model_only_in_front_of_the_reranker(capsys):
    with pytest.raises(SystemExit):
        train_reranking.main(["--train_stage", "global", "--global_model", "x:y"])
    assert "goes with --train_stage reranker, not global" in capsys.readouterr().err
