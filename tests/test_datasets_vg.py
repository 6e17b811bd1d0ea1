"""VG-format datasets: layout, UTM parsing, positives, errors, unreadable images, ImageDataset."""

import json
import logging
import pickle
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datasets_ws
from datasets_ws import ImageDataset, SplitRequest, load_split
from places import images
from places.images import IMAGENET_MEAN, IMAGENET_STD, BadImageError, find_unreadable_images, load_image
from places.index import DatasetError, PlaceIndex, positives_within_radius, without_images
from places.vg import build_vg_split, utm_from_filename

IMAGE_WIDTH, IMAGE_HEIGHT = 48, 32

# (east, north) of the images of the tiny dataset; the train split uses the same layout as val.
DATABASE_UTMS = {
    "d0": (0.0, 0.0),
    "d1": (5.0, 0.0),
    "d2": (20.0, 0.0),
    "d3": (100.0, 0.0),
    "d4": (0.0, 24.0),
    "d5": (300.0, 300.0),
}
QUERIES_UTMS = {
    "q0": (1.0, 0.0),  # hard: d0 d1; soft: d0 d1 d2 d4
    "q1": (60.0, 0.0),  # nothing within 25 m
    "q2": (99.0, 3.0),  # hard: d3
    "q3": (300.0, 292.0),
}  # hard: d5 (in a sub-folder whose name holds an '@')


def vg_name(east: float, north: float, note: str) -> str:
    """A VG-benchmark file name with the given UTM."""
    return f"@{east:.2f}@{north:.2f}@17@T@40.44@-79.99@{note}@0@0@0@0@0@2020@{note}@.jpg"


def write_jpeg(path: Path, color: tuple[int, int, int] = (128, 64, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (IMAGE_WIDTH, IMAGE_HEIGHT), color).save(path, quality=95)
    return path


def make_vg_dataset(datasets_folder: Path, name: str = "tiny", splits: tuple[str, ...] = ("train", "val")) -> Path:
    """A VG-format dataset with the images above in every split; returns the dataset folder."""
    for split in splits:
        split_folder = datasets_folder / name / "images" / split
        for note, (east, north) in DATABASE_UTMS.items():
            sub_folder = "block@7/" if note == "d5" else ""
            write_jpeg(split_folder / "database" / f"{sub_folder}{vg_name(east, north, note)}")
        for note, (east, north) in QUERIES_UTMS.items():
            write_jpeg(split_folder / "queries" / vg_name(east, north, note))
    return datasets_folder / name


def brute_force_positives(database_utms: np.ndarray, queries_utms: np.ndarray, radius: float) -> list[np.ndarray]:
    """Database indices within radius of each query, sorted by distance then index."""
    distances = np.linalg.norm(queries_utms[:, None, :] - database_utms[None, :, :], axis=2)
    positives = []
    for row in distances:
        inside = np.flatnonzero(row <= radius)
        positives.append(inside[np.lexsort((inside, row[inside]))])
    return positives


def notes(paths: list[str]) -> list[str]:
    return [Path(p).name.split("@")[7] for p in paths]


def test_utm_from_filename_reads_the_base_name_only():
    assert utm_from_filename("/data/a@b@c/queries/@583.25@4477.5@17@T@@.jpg") == (583.25, 4477.5)
    with pytest.raises(DatasetError, match=r"no_utm\.jpg.*@UTM_east@UTM_north"):
        utm_from_filename("/data/x@1@2/no_utm.jpg")
    with pytest.raises(DatasetError, match=r"@east@12@\.jpg.*'east'"):
        utm_from_filename("/data/@east@12@.jpg")


def test_vg_split_paths_sorted_utms_and_positives(tmp_path):
    make_vg_dataset(tmp_path)
    index = build_vg_split(tmp_path, "tiny", "val")
    assert index.name == "tiny/val" and index.root == tmp_path / "tiny" / "images" / "val"
    assert index.database_paths == sorted(index.database_paths) and index.queries_paths == sorted(index.queries_paths)
    assert index.database_paths[-1].startswith("database/block@7/")  # '@' in a parent folder is fine
    assert index.queries_paths[0].startswith("queries/")
    assert repr(index) == "< tiny/val: 6 database, 4 queries >"
    expected_database = np.array([DATABASE_UTMS[n] for n in notes(index.database_paths)])
    expected_queries = np.array([QUERIES_UTMS[n] for n in notes(index.queries_paths)])
    np.testing.assert_allclose(index.database_utms, expected_database)
    np.testing.assert_allclose(index.queries_utms, expected_queries)
    assert index.hard_positives_per_query is None  # val: no hard positives
    for found, expected in zip(
        index.soft_positives_per_query, brute_force_positives(expected_database, expected_queries, 25.0)
    ):
        np.testing.assert_array_equal(found, expected)
    assert index.database_keys[0] == Path(index.database_paths[0]).stem
    assert index.absolute_path(index.database_num).is_file()  # the first query
    with pytest.raises(IndexError, match="out of range"):
        index.absolute_path(len(index))


def test_train_split_hard_positives_and_dropped_queries(tmp_path, caplog):
    make_vg_dataset(tmp_path)
    with caplog.at_level(logging.INFO, logger="places.index"):
        index = build_vg_split(tmp_path, "tiny", "train")
    assert sorted(notes(index.queries_paths)) == ["q0", "q2", "q3"]  # q1 has no image within 10 m
    assert "dropped 1 of 4 queries without a hard positive" in caplog.text
    database = np.array([DATABASE_UTMS[n] for n in notes(index.database_paths)])
    queries = np.array([QUERIES_UTMS[n] for n in notes(index.queries_paths)])
    for found, expected in zip(index.hard_positives_per_query, brute_force_positives(database, queries, 10.0)):
        np.testing.assert_array_equal(found, expected)
    for found, expected in zip(index.soft_positives_per_query, brute_force_positives(database, queries, 25.0)):
        np.testing.assert_array_equal(found, expected)
    q0_soft = [notes(index.database_paths)[i] for i in index.soft_positives_per_query[0]]
    assert q0_soft == ["d0", "d1", "d2", "d4"]  # sorted by distance: 1, 4, 19, 24.02 m


def test_positives_within_radius_matches_brute_force_and_never_crosses_groups():
    rng = np.random.default_rng(0)
    database = rng.uniform(0, 100, size=(300, 2))
    queries = rng.uniform(0, 100, size=(40, 2))
    for found, expected in zip(
        positives_within_radius(database, queries, 12.5), brute_force_positives(database, queries, 12.5)
    ):
        np.testing.assert_array_equal(found, expected)
        assert found.dtype == np.int64
    database_groups = ["a" if i % 2 else "b" for i in range(len(database))]
    queries_groups = ["a"] * 20 + ["b"] * 20 + []
    grouped = positives_within_radius(database, queries, 12.5, database_groups, queries_groups)
    for q, (found, everywhere) in enumerate(zip(grouped, brute_force_positives(database, queries, 12.5))):
        same_group = [i for i in everywhere if database_groups[i] == queries_groups[q]]
        np.testing.assert_array_equal(found, same_group)


def test_missing_dataset_folder_names_it_and_the_layout(tmp_path):
    make_vg_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"pitts30k not found.*tiny.*images/\{train,val,test\}"):
        build_vg_split(tmp_path, "pitts30k", "val")


def test_missing_split_lists_the_splits_present(tmp_path):
    make_vg_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"split 'test' not found.*splits present: \['train', 'val'\]"):
        build_vg_split(tmp_path, "tiny", "test")


def test_split_without_images_is_an_error(tmp_path):
    split_folder = tmp_path / "tiny" / "images" / "val"
    (split_folder / "database").mkdir(parents=True)
    write_jpeg(split_folder / "queries" / vg_name(1, 2, "q"))
    with pytest.raises(DatasetError, match=r"no \.jpg images under .*val/database"):
        build_vg_split(tmp_path, "tiny", "val")


def test_malformed_file_name_names_the_file(tmp_path):
    make_vg_dataset(tmp_path)
    write_jpeg(tmp_path / "tiny" / "images" / "val" / "queries" / "holiday.jpg")
    with pytest.raises(DatasetError, match=r"queries/holiday\.jpg"):
        build_vg_split(tmp_path, "tiny", "val")


def corrupt_images(split_folder: Path) -> tuple[Path, Path]:
    """Truncate one database JPEG and replace one query with text; returns both paths."""
    truncated = next((split_folder / "database").glob("*d2@.jpg"))
    truncated.write_bytes(truncated.read_bytes()[:300])
    text_file = next((split_folder / "queries").glob("*q2@.jpg"))
    text_file.write_text("this is not a JPEG")
    return truncated, text_file


def test_unreadable_images_raise_bad_image_error_naming_the_file(tmp_path):
    make_vg_dataset(tmp_path)
    truncated, text_file = corrupt_images(tmp_path / "tiny" / "images" / "val")
    index = build_vg_split(tmp_path, "tiny", "val")  # nothing is decoded while building
    dataset = ImageDataset(index, (IMAGE_HEIGHT, IMAGE_WIDTH))
    global_index = {str(index.absolute_path(i)): i for i in range(len(index))}
    with pytest.raises(BadImageError, match=rf"{re.escape(truncated.name)}.*[Tt]runcated.*--skip_bad_images"):
        dataset[global_index[str(truncated)]]
    with pytest.raises(BadImageError, match=rf"{re.escape(text_file.name)}.*cannot identify"):
        dataset[global_index[str(text_file)]]
    with pytest.raises(BadImageError, match=r"missing\.jpg.*No such file"):
        load_image(tmp_path / "missing.jpg", None)


def test_find_unreadable_images_with_a_worker(tmp_path):
    make_vg_dataset(tmp_path)
    truncated, text_file = corrupt_images(tmp_path / "tiny" / "images" / "val")
    paths = sorted((tmp_path / "tiny" / "images" / "val").rglob("*.jpg"))
    unreadable = find_unreadable_images(paths, num_workers=1)
    assert sorted(path for path, _ in unreadable) == sorted([str(truncated), str(text_file)])
    assert all(reason for _, reason in unreadable)


def test_load_split_skip_bad_images_excludes_and_reports(tmp_path, caplog):
    make_vg_dataset(tmp_path)
    truncated, text_file = corrupt_images(tmp_path / "tiny" / "images" / "val")
    with caplog.at_level(logging.INFO, logger="datasets_ws"):
        index = load_split(SplitRequest(tmp_path, "tiny", "val", skip_bad_images=True))
    assert (index.database_num, index.queries_num) == (5, 3)
    assert sorted(Path(path).name for path, _ in index.excluded) == sorted([truncated.name, text_file.name])
    assert "leaving out 2 unreadable images" in caplog.text and truncated.name in caplog.text
    database = np.array([DATABASE_UTMS[n] for n in notes(index.database_paths)])
    queries = np.array([QUERIES_UTMS[n] for n in notes(index.queries_paths)])
    for found, expected in zip(index.soft_positives_per_query, brute_force_positives(database, queries, 25.0)):
        np.testing.assert_array_equal(found, expected)
    images = [ImageDataset(index, (IMAGE_HEIGHT, IMAGE_WIDTH))[i][0] for i in range(len(index))]
    assert len(images) == 8
    unchecked = load_split(SplitRequest(tmp_path, "tiny", "val"))  # without the flag nothing is scanned
    assert (unchecked.database_num, unchecked.queries_num, unchecked.excluded) == (6, 4, [])


def test_without_images_renumbers_positives_and_rejects_unknown_paths(tmp_path):
    make_vg_dataset(tmp_path)
    index = build_vg_split(tmp_path, "tiny", "val")
    d1 = notes(index.database_paths).index("d1")
    smaller = without_images(index, {str(index.absolute_path(d1)): "blurred"}, None)
    assert smaller.excluded == [(index.database_paths[d1], "blurred")]
    q0 = notes(smaller.queries_paths).index("q0")
    assert [notes(smaller.database_paths)[i] for i in smaller.soft_positives_per_query[q0]] == ["d0", "d2", "d4"]
    by_relative_path = without_images(index, [index.database_paths[d1]], None)
    assert by_relative_path.database_paths == smaller.database_paths
    with pytest.raises(DatasetError, match=r"not images of this split.*nowhere\.jpg"):
        without_images(index, ["database/nowhere.jpg"], None)


def test_base_dataset_item_shape_dtype_and_normalisation(tmp_path):
    make_vg_dataset(tmp_path)
    index = build_vg_split(tmp_path, "tiny", "val")
    image, i = ImageDataset(index, (IMAGE_HEIGHT, IMAGE_WIDTH))[3]
    assert i == 3 and image.shape == (3, IMAGE_HEIGHT, IMAGE_WIDTH) and image.dtype == torch.float32
    expected = (torch.tensor([128, 64, 200]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image.mean(dim=(1, 2)), expected.float(), atol=0.04, rtol=0)
    resized, _ = ImageDataset(index, (16, 24))[index.database_num]
    assert resized.shape == (3, 16, 24)
    assert ImageDataset(index, None)[0][0].shape == (3, IMAGE_HEIGHT, IMAGE_WIDTH)
    with pytest.raises(ValueError, match="image_size"):
        ImageDataset(index, (480,))
    copied = pickle.loads(pickle.dumps(ImageDataset(index, (16, 24))))  # what DataLoader workers receive
    torch.testing.assert_close(copied[2][0], ImageDataset(index, (16, 24))[2][0])


def test_grayscale_image_becomes_three_channels(tmp_path):
    path = tmp_path / "gray.jpg"
    Image.new("L", (20, 10), 100).save(path)
    assert load_image(path, (10, 20)).shape == (3, 10, 20)


def test_load_split_generates_the_toy_world_once(tmp_path, monkeypatch):
    calls = []

    def make_toy_world(datasets_folder):
        calls.append(Path(datasets_folder))
        world = make_vg_dataset(Path(datasets_folder), "toy_world", splits=("val",))
        (world / "toy_world.json").write_text('{"generator_version": 7}')  # the manifest, written last
        return world

    def read_manifest(world_folder):
        path = Path(world_folder) / "toy_world.json"
        return json.loads(path.read_text()) if path.is_file() else None

    fake_module = types.SimpleNamespace(
        make_toy_world=make_toy_world, read_manifest=read_manifest, TOY_WORLD_NAME="toy_world", GENERATOR_VERSION=7
    )
    monkeypatch.setattr(datasets_ws, "toy_world", fake_module)
    index = load_split(SplitRequest(tmp_path / "data", "toy_world", "val"))
    assert index.name == "toy_world/val" and (index.database_num, index.queries_num) == (6, 4)
    load_split(SplitRequest(tmp_path / "data", "toy_world", "val"))
    assert calls == [tmp_path / "data"]


def test_place_index_checks_per_image_lengths(tmp_path):
    with pytest.raises(ValueError, match="soft_positives_per_query has 1 entries, expected 2"):
        PlaceIndex(
            name="x/val",
            root=tmp_path,
            database_paths=["a.jpg"],
            queries_paths=["b.jpg", "c.jpg"],
            database_utms=None,
            queries_utms=None,
            soft_positives_per_query=[np.array([0])],
        )


def test_module_has_the_imagenet_constants():
    assert images.IMAGENET_MEAN == (0.485, 0.456, 0.406) and images.IMAGENET_STD == (0.229, 0.224, 0.225)
