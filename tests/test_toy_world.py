"""Tests of the built-in toy-world generator (places/toy_world/), on the `small` preset unless marked slow."""

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets_ws
from places.toy_world import (
    GENERATOR_VERSION,
    MANIFEST_NAME,
    PRESETS,
    SPLITS,
    TOY_WORLD_NAME,
    SplitSpec,
    config_as_json,
    config_from_json,
    expected_counts,
    make_toy_world,
    read_manifest,
)

SMALL = PRESETS["small"]
# One short route per split and no look-alikes: enough to test rebuilding, and several times faster than SMALL.
TINY = dataclasses.replace(
    SMALL,
    **{
        split: dataclasses.replace(
            getattr(SMALL, split), num_routes=1, route_length_m=54.0, queries_per_route=2, num_lookalikes=0
        )
        for split in SPLITS
    },
)
FOLDERS = ("database", "queries")


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small toy world shared by the read-only tests of this module."""
    return make_toy_world(tmp_path_factory.mktemp("datasets"), SMALL, progress=False)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny toy world that the rebuild tests copy and damage."""
    return make_toy_world(tmp_path_factory.mktemp("datasets"), TINY, progress=False)


def image_paths(world_folder: Path, split: str, folder: str) -> list[Path]:
    """The sorted JPEG files of one folder of the world."""
    return sorted((world_folder / "images" / split / folder).glob("*.jpg"))


def utm_of(path: Path | str) -> np.ndarray:
    """[east, north] of an image, read the way the dataset reader reads it."""
    fields = Path(path).name.split("@")
    return np.array([float(fields[1]), float(fields[2])])


def utms(paths: list[Path]) -> np.ndarray:
    """(N, 2) UTM coordinates of `paths`."""
    return np.stack([utm_of(path) for path in paths])


def file_bytes(world_folder: Path) -> dict[str, bytes]:
    """Every file under `world_folder`, keyed by its path relative to the folder."""
    return {
        str(path.relative_to(world_folder)): path.read_bytes()
        for path in sorted(world_folder.rglob("*"))
        if path.is_file()
    }


def modification_times(world_folder: Path) -> dict[str, int]:
    """Modification time (ns) of every file under `world_folder`."""
    return {
        str(path.relative_to(world_folder)): path.stat().st_mtime_ns
        for path in world_folder.rglob("*")
        if path.is_file()
    }


def thumbnail(path: Path | str) -> np.ndarray:
    """A 16x12 colour thumbnail, flattened: what global appearance looks like with every detail averaged away."""
    with Image.open(path) as image:
        return np.asarray(image.resize((16, 12), Image.Resampling.BOX), dtype=np.float32).ravel()


def test_layout_has_six_non_empty_folders_of_rgb_jpegs_at_the_configured_size(small_world: Path) -> None:
    assert small_world.name == TOY_WORLD_NAME
    height, width = SMALL.image_size
    counts = expected_counts(SMALL)
    for split in SPLITS:
        for folder in FOLDERS:
            paths = image_paths(small_world, split, folder)
            assert len(paths) == counts[split][folder] > 0, f"{split}/{folder}"
            for path in paths:
                with Image.open(path) as image:
                    assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (width, height)), path


def test_manifest_records_config_and_counts(small_world: Path) -> None:
    manifest = read_manifest(small_world)
    assert manifest["config"] == json.loads(json.dumps(dataclasses.asdict(SMALL)))
    assert manifest["counts"] == expected_counts(SMALL)


def test_file_names_parse_to_utm_floats_and_are_unique(small_world: Path) -> None:
    all_pano_ids = []
    for split in SPLITS:
        for folder in FOLDERS:
            names = [path.name for path in image_paths(small_world, split, folder)]
            assert len(set(names)) == len(names)
            for name in names:
                fields = name.split("@")
                assert len(fields) == 16 and fields[0] == "" and fields[-1] == ".jpg", name
                float(fields[1]), float(fields[2])
                assert fields[14] in ("day", "dusk", "night"), name
                all_pano_ids.append(fields[7])
    assert len(set(all_pano_ids)) == len(all_pano_ids)


def test_every_query_has_a_database_image_within_25_m_and_most_within_10_m(small_world: Path) -> None:
    for split in SPLITS:
        database_utms = utms(image_paths(small_world, split, "database"))
        query_utms = utms(image_paths(small_world, split, "queries"))
        nearest_m = np.linalg.norm(query_utms[:, None] - database_utms[None], axis=2).min(axis=1)
        assert nearest_m.max() < 25.0, f"{split}: a query is {nearest_m.max():.1f} m from every database image"
        assert (nearest_m < 10.0).mean() > 0.8, split


def test_splits_are_more_than_1_km_apart(small_world: Path) -> None:
    split_utms = {
        split: utms(image_paths(small_world, split, "database") + image_paths(small_world, split, "queries"))
        for split in SPLITS
    }
    for index, split_a in enumerate(SPLITS):
        for split_b in SPLITS[index + 1 :]:
            gaps_m = np.linalg.norm(split_utms[split_a][:, None] - split_utms[split_b][None], axis=2)
            assert gaps_m.min() > 1000.0, f"{split_a} and {split_b} are {gaps_m.min():.0f} m apart"


def test_lookalikes_are_far_apart_globally_similar_and_locally_different(small_world: Path) -> None:
    lookalikes = read_manifest(small_world)["lookalikes"]
    assert {record["split"] for record in lookalikes} == set(SPLITS)
    for split in SPLITS:
        database_paths = image_paths(small_world, split, "database")
        thumbnails = np.stack([thumbnail(path) for path in database_paths])
        database_utms = utms(database_paths)
        index_of = {path.name: index for index, path in enumerate(database_paths)}
        pairs = [pair for record in lookalikes if record["split"] == split for pair in record["image_pairs"]]
        assert pairs, f"{split} has no look-alike image pairs"
        for pair in pairs:
            source, target = index_of[Path(pair["source"]).name], index_of[Path(pair["target"]).name]
            distance_m = np.linalg.norm(database_utms[source] - database_utms[target])
            assert distance_m > 100.0 and abs(distance_m - pair["distance_m"]) < 0.1, pair
            # Globally: the partner is the closest thumbnail among all images of other places (> 25 m away).
            thumbnail_gaps = np.linalg.norm(thumbnails - thumbnails[source], axis=1)
            elsewhere = np.linalg.norm(database_utms - database_utms[source], axis=1) > 25.0
            assert thumbnail_gaps[target] <= thumbnail_gaps[elsewhere].min(), pair
            # Locally: windows, doors and signs differ, so the full images do not.
            with Image.open(small_world / pair["source"]) as source_image:
                source_pixels = np.asarray(source_image, dtype=np.float32)
            with Image.open(small_world / pair["target"]) as target_image:
                pixel_gap = np.abs(source_pixels - np.asarray(target_image, dtype=np.float32))
            assert pixel_gap.mean() > 5.0, pair


def test_night_queries_are_darker_than_day_ones_but_not_black(small_world: Path) -> None:
    brightness = {"day": [], "night": []}
    for split in SPLITS:
        for path in image_paths(small_world, split, "queries"):
            lighting = path.name.split("@")[14]
            if lighting in brightness:
                with Image.open(path) as image:
                    brightness[lighting].append(np.asarray(image.convert("L"), dtype=np.float32).mean())
    assert brightness["day"] and brightness["night"]
    assert 20.0 < np.mean(brightness["night"]) < 0.6 * np.mean(brightness["day"])


def test_same_seed_gives_identical_bytes(small_world: Path, tmp_path: Path) -> None:
    again = make_toy_world(tmp_path, SMALL, progress=False)
    assert file_bytes(again) == file_bytes(small_world)


def test_another_seed_gives_other_files(tiny_world: Path, tmp_path: Path) -> None:
    reseeded = make_toy_world(tmp_path, dataclasses.replace(TINY, seed=1), progress=False)
    reseeded_bytes, original_bytes = file_bytes(reseeded), file_bytes(tiny_world)
    assert reseeded_bytes.keys() != original_bytes.keys()
    assert sorted(reseeded_bytes.values()) != sorted(original_bytes.values())


def test_second_call_rewrites_nothing_unless_forced(tiny_world: Path, tmp_path: Path) -> None:
    datasets_folder = tmp_path / "datasets"
    shutil.copytree(tiny_world, datasets_folder / TOY_WORLD_NAME)
    before = modification_times(datasets_folder / TOY_WORLD_NAME)
    assert make_toy_world(datasets_folder, TINY, progress=False) == datasets_folder / TOY_WORLD_NAME
    assert modification_times(datasets_folder / TOY_WORLD_NAME) == before
    time.sleep(0.01)
    make_toy_world(datasets_folder, TINY, force=True, progress=False)
    after_force = modification_times(datasets_folder / TOY_WORLD_NAME)
    assert after_force.keys() == before.keys()
    assert all(after_force[name] > before[name] for name in before), "force=True must rewrite every file"


@pytest.mark.parametrize("damage", ["delete manifest", "delete an image", "corrupt manifest"])
def test_incomplete_world_is_rebuilt_and_other_files_are_kept(tiny_world: Path, tmp_path: Path, damage: str) -> None:
    datasets_folder = tmp_path / "datasets"
    world_folder = datasets_folder / TOY_WORLD_NAME
    shutil.copytree(tiny_world, world_folder)
    (datasets_folder / "other_dataset.txt").write_text("not the toy world's")
    (world_folder / "notes.txt").write_text("a user's notes")
    stray_image = world_folder / "images" / "train" / "database" / "stray.jpg"
    if damage == "delete manifest":
        (world_folder / MANIFEST_NAME).unlink()
        stray_image.write_bytes(b"left by an interrupted run")
    elif damage == "delete an image":
        image_paths(world_folder, "val", "queries")[0].unlink()
    else:
        (world_folder / MANIFEST_NAME).write_text("{ not json")
    make_toy_world(datasets_folder, TINY, progress=False)
    assert file_bytes(world_folder / "images") == file_bytes(tiny_world / "images")
    assert read_manifest(world_folder) == read_manifest(tiny_world)
    assert (datasets_folder / "other_dataset.txt").read_text() == "not the toy world's"
    assert (world_folder / "notes.txt").read_text() == "a user's notes"


def test_another_config_triggers_a_rebuild(tiny_world: Path, tmp_path: Path) -> None:
    datasets_folder = tmp_path / "datasets"
    shutil.copytree(tiny_world, datasets_folder / TOY_WORLD_NAME)
    smaller_images = dataclasses.replace(TINY, image_size=(96, 128))
    world_folder = make_toy_world(datasets_folder, smaller_images, progress=False)
    assert read_manifest(world_folder)["config"]["image_size"] == [96, 128]
    for split in SPLITS:
        for folder in FOLDERS:
            paths = image_paths(world_folder, split, folder)
            assert len(paths) == expected_counts(smaller_images)[split][folder]
            with Image.open(paths[0]) as image:
                assert image.size == (128, 96)


def test_a_world_of_an_older_generator_version_is_made_again_with_its_own_config(
    tiny_world: Path, tmp_path: Path
) -> None:
    """A script that needs the toy world remakes one from an older generator (what the demo then refits its global
    model on), keeping that world's own config and seed rather than the default's."""
    assert config_from_json(config_as_json(TINY)) == TINY
    datasets_folder = tmp_path / "datasets"
    shutil.copytree(tiny_world, datasets_folder / TOY_WORLD_NAME)
    manifest_path = datasets_folder / TOY_WORLD_NAME / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["generator_version"] = GENERATOR_VERSION - 1
    manifest_path.write_text(json.dumps(manifest))
    index = datasets_ws.load_split(datasets_ws.SplitRequest(datasets_folder, "toy_world", "val"))
    assert index.queries_num == expected_counts(TINY)["val"]["queries"]
    rebuilt = read_manifest(datasets_folder / TOY_WORLD_NAME)
    assert rebuilt["generator_version"] == GENERATOR_VERSION and rebuilt["config"] == config_as_json(TINY)


def test_invalid_configs_are_refused_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match="block_length_m"):
        dataclasses.replace(SMALL, block_length_m=20.0)
    with pytest.raises(ValueError, match="val and test"):
        dataclasses.replace(SMALL, test=dataclasses.replace(SMALL.test, origin_east_m=SMALL.val.origin_east_m))
    with pytest.raises(ValueError, match="lane_spacing_m"):
        dataclasses.replace(SMALL, lane_spacing_m=100.0)
    with pytest.raises(ValueError, match="cannot place 5 look-alikes"):
        dataclasses.replace(SMALL, train=SplitSpec(2, 189.0, 8, 5, 500_000.0, 5_030_000.0))


def test_default_preset_sizes() -> None:
    """A training split several times the database of the others (the reranker needs many places), and val / test
    splits with enough queries that one query moves R@1 by under half a point (test) and about half a point (val)."""
    counts = expected_counts(PRESETS["default"])
    assert 700 <= counts["train"]["database"] <= 800 and 650 <= counts["train"]["queries"] <= 750
    assert 150 <= counts["val"]["database"] <= 200 and counts["val"]["queries"] >= 200
    assert 150 <= counts["test"]["database"] <= 250 and counts["test"]["queries"] >= 300


@pytest.mark.slow
def test_default_preset_is_small(tmp_path: Path) -> None:
    world_folder = make_toy_world(tmp_path, PRESETS["default"], progress=False)
    size_bytes = sum(path.stat().st_size for path in world_folder.rglob("*") if path.is_file())
    assert size_bytes < 15e6, f"default toy world takes {size_bytes / 1e6:.1f} MB, expected about 12 MB"
