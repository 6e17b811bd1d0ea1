"""Plain folders of photos (ground truth from VG names, EXIF GPS or none), EXIF orientation, the reranking pictures
and `bash test.sh` without arguments."""

import csv
import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import utm
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

import outputs
import test as test_script
from datasets_ws import SplitRequest, load_split
from places.folders import build_folder_split, exif_gps_degrees, read_photo_info
from places.images import open_rgb_image
from places.index import DatasetError, utm_from_filename, vg_name_coordinates

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num_workers", "0", "--infer_batch_size", "25", "--rerank_top", "10", "--recall_values", "1", "5", "10"]


def _rational_dms(value: float) -> tuple[IFDRational, IFDRational, IFDRational]:
    """Degrees as EXIF (degrees, minutes, seconds) rationals, seconds to a millionth (about 0.03 mm)."""
    degrees = int(value)
    minutes = int((value - degrees) * 60)
    seconds = (value - degrees - minutes / 60) * 3600
    return IFDRational(degrees, 1), IFDRational(minutes, 1), IFDRational(round(seconds * 1e6), 1_000_000)


def gps_exif(latitude: float, longitude: float) -> Image.Exif:
    exif = Image.Exif()
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps.update(
        {
            1: "N" if latitude >= 0 else "S",
            2: _rational_dms(abs(latitude)),
            3: "E" if longitude >= 0 else "W",
            4: _rational_dms(abs(longitude)),
        }
    )
    return exif


@pytest.fixture(scope="module")
def photo_folders(small_toy_world, tmp_path_factory):
    """The small toy world's test split re-saved three ways, with the same pixels: VG-format names ('vg'), plain
    names with EXIF GPS tags carrying the names' coordinates ('exif'), plain names and no coordinates ('plain')."""
    base = tmp_path_factory.mktemp("photos")
    split = small_toy_world / "toy_world" / "images" / "test"
    for part in ("database", "queries"):
        for number, source in enumerate(sorted((split / part).glob("*.jpg"))):
            east, north = utm_from_filename(source)
            zone, letter = source.name.split("@")[3:5]
            latitude, longitude = utm.to_latlon(east, north, int(zone), letter)
            with Image.open(source) as image:
                pixels = image.convert("RGB")
            for kind, name, exif in (
                ("vg", source.name, Image.Exif()),
                ("exif", f"IMG_{number:04d}.JPG", gps_exif(latitude, longitude)),
                ("plain", f"IMG_{number:04d}.JPG", Image.Exif()),
            ):
                (base / kind / part).mkdir(parents=True, exist_ok=True)
                pixels.save(base / kind / part / name, quality=95, exif=exif)
    return base


def _run(folders: Path, tmp_path: Path, checkpoint: Path, *extra: str) -> tuple[dict, Path]:
    output = tmp_path / folders.name
    results = test_script.main(
        [
            "--database_folder",
            str(folders / "database"),
            "--queries_folder",
            str(folders / "queries"),
            "--resume",
            str(checkpoint),
            "--output_folder",
            str(output),
            *FAST,
            *extra,
        ]
    )
    return results, output


def test_exif_gps_gives_the_recalls_of_vg_names(photo_folders, small_toy_world, trained_toy_checkpoint, tmp_path):
    from_names, _ = _run(photo_folders / "vg", tmp_path, trained_toy_checkpoint)
    from_exif, output = _run(photo_folders / "exif", tmp_path, trained_toy_checkpoint)
    assert from_exif["recalls"]["global"] is not None
    assert from_exif["recalls"] == from_names["recalls"]
    assert from_exif["dataset"]["name"] == "folders" and from_exif["dataset"]["split"] is None
    assert (from_exif["dataset"]["database_num"], from_exif["dataset"]["queries_num"]) == (38, 12)
    toy = load_split(SplitRequest(small_toy_world, "toy_world", "test"))
    exif = build_folder_split(photo_folders / "exif" / "database", photo_folders / "exif" / "queries")
    np.testing.assert_allclose(exif.database_utms, toy.database_utms, atol=0.01)  # centimetres, as in the names
    for found, expected in zip(exif.soft_positives_per_query, toy.soft_positives_per_query):
        np.testing.assert_array_equal(found, expected)
    with open(output / "predictions.csv") as file:
        assert any(row["first_correct_rank"] for row in csv.DictReader(file))


def test_photos_without_coordinates_give_predictions_and_pictures_only(
    photo_folders, trained_toy_checkpoint, tmp_path, caplog
):
    with caplog.at_level(logging.INFO):
        results, output = _run(
            photo_folders / "plain",
            tmp_path,
            trained_toy_checkpoint,
            *["--num_preds_to_save", "3", "--rerank_pictures", "2", "--num_queries_to_save", "4"],
        )
    assert results["recalls"] == {"global": None, "reranked": None}
    assert "no ground truth" in caplog.text
    on_disk = json.loads((output / "results.json").read_text())
    assert on_disk["recalls"] == {"global": None, "reranked": None}
    with open(output / "predictions.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 2 * 12 and all(row["first_correct_rank"] == "" for row in rows)
    assert all(row["database_paths"].split("|")[0].startswith("database/IMG_") for row in rows)
    predictions, reranking = (
        sorted((output / "predictions").glob("*.png")),
        sorted((output / "reranking").glob("*.png")),
    )
    assert [p.name[:5] for p in predictions] == ["00000", "00004", "00007", "00011"]  # 4 queries spread evenly
    assert [p.name for p in reranking] == [p.name for p in predictions]
    with Image.open(reranking[0]) as picture:
        assert picture.height > 2 * 240  # a row per candidate
        light_grey_frame = picture.getpixel((picture.width - 2, 16 + 16 + 120))  # right edge of the first candidate
    assert light_grey_frame == (200, 200, 200)  # unknown: neither correct (green) nor wrong (red)


def test_rerank_pictures_on_the_toy_world_name_the_rank_change(
    small_toy_world, trained_toy_checkpoint, tmp_path, monkeypatch
):
    drawn = []
    draw = outputs.save_rerank_picture
    monkeypatch.setattr(
        outputs, "save_rerank_picture", lambda path, *args: (drawn.append((path, args[1])), draw(path, *args))
    )
    results = test_script.main(
        [
            "--datasets_folder",
            str(small_toy_world),
            "--resume",
            str(trained_toy_checkpoint),
            "--output_folder",
            str(tmp_path / "run"),
            "--rerank_pictures",
            "3",
            "--num_queries_to_save",
            "2",
            *FAST,
        ]
    )
    assert results["recalls"]["reranked"] is not None
    pictures = sorted((tmp_path / "run" / "reranking").glob("*.png"))
    assert len(pictures) == 2 and not (tmp_path / "run" / "predictions").exists()
    with Image.open(pictures[0]) as picture:
        query_width = 192 * 240 // 144 + 10
        assert picture.width == 2 * query_width + 40 and picture.height == 16 + 3 * (16 + 250 + 6)
    with open(tmp_path / "run" / "predictions.csv") as file:
        rows = {(row["query_index"], row["ranking"]): row["database_paths"].split("|") for row in csv.DictReader(file)}
    assert [path.name for path, _ in drawn] == [p.name for p in pictures]
    for path, candidates in drawn:
        query = str(int(path.name[:5]))
        global_order, reranked_order = rows[(query, "global")], rows[(query, "reranked")]
        for rank, candidate in enumerate(candidates):
            global_rank = global_order.index(reranked_order[rank]) + 1
            assert re.match(rf"reranked #{rank + 1} \(global #{global_rank}\), score [01]\.\d{{3}}, ", candidate.title)
            assert candidate.title.endswith(("correct", "wrong")) and candidate.correct is not None
            assert candidate.attention.shape == (30, 30)


# ----------------------------------------------------------------------------------------------------------------
# The folder reader


def test_mixed_coordinates_give_no_ground_truth_with_a_warning(photo_folders, tmp_path, caplog):
    mixed = tmp_path / "mixed"
    shutil.copytree(photo_folders / "exif", mixed)
    shutil.copy(next((photo_folders / "plain" / "queries").glob("*.JPG")), mixed / "queries" / "no_gps.jpg")
    with caplog.at_level(logging.INFO, logger="places.folders"):
        index = build_folder_split(mixed / "database", mixed / "queries")
    assert index.soft_positives_per_query is None and index.queries_num == 13
    assert "1 of 51 images have no coordinates" in caplog.text and "no_gps.jpg" in caplog.text
    excluded = build_folder_split(mixed / "database", mixed / "queries", exclude=[mixed / "queries" / "no_gps.jpg"])
    assert excluded.soft_positives_per_query is not None  # an excluded image does not count
    assert excluded.excluded == [("queries/no_gps.jpg", "excluded by the caller")]


def test_folder_mistakes_are_named(tmp_path, photo_folders):
    with pytest.raises(DatasetError, match="--database_folder .*nowhere: folder not found"):
        build_folder_split(tmp_path / "nowhere", photo_folders / "plain" / "queries")
    with pytest.raises(DatasetError, match="lies inside --database_folder"):
        build_folder_split(photo_folders / "plain", photo_folders / "plain" / "queries")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(DatasetError, match=r"no queries images under .*empty \(searched recursively for \.jpg"):
        build_folder_split(photo_folders / "plain" / "database", tmp_path / "empty")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--database_folder", "a"], "--database_folder and --queries_folder go together"),
        (["--database_folder", "a", "--queries_folder", "b", "--dataset_name", "msls"], "replace --dataset_name"),
    ],
)
def test_folder_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit):
        test_script.main(flags)
    assert message in capsys.readouterr().err


def test_vg_names_and_exif_gps_are_parsed():
    assert vg_name_coordinates("@583.25@4477.5@17@T@40.4@-80.0@x@.jpg") == (583.25, 4477.5, "17N")
    assert vg_name_coordinates("@583.25@4477.5@33@H@@.jpg") == (583.25, 4477.5, "33S")
    assert vg_name_coordinates("@583.25@4477.5@.jpg") == (583.25, 4477.5, None)  # no zone: compared with all
    assert vg_name_coordinates("IMG_0001.JPG") is None and vg_name_coordinates("@a@b@c@d@.jpg") is None
    assert vg_name_coordinates("x@1@2@.jpg") is None and vg_name_coordinates("@nan@2@.jpg") is None
    assert exif_gps_degrees(gps_exif(-33.5, -70.25)) == pytest.approx((-33.5, -70.25), abs=1e-9)
    assert exif_gps_degrees(gps_exif(0.0, 0.0)) is None  # what cameras without a fix write
    assert exif_gps_degrees(Image.Exif()) is None
    broken = gps_exif(45.0, 9.0)
    broken.get_ifd(ExifTags.IFD.GPSInfo)[2] = (IFDRational(1, 0), IFDRational(0, 1), IFDRational(0, 1))
    assert exif_gps_degrees(broken) is None
    with_bytes = gps_exif(45.0, 9.0)
    with_bytes.get_ifd(ExifTags.IFD.GPSInfo)[1] = b"S"
    assert exif_gps_degrees(with_bytes)[0] == pytest.approx(-45.0)


def test_exif_orientation_is_applied_and_portrait_photos_are_reported(tmp_path, caplog):
    pixels = Image.new("RGB", (40, 20), "red")
    pixels.paste(Image.new("RGB", (10, 20), "blue"), (0, 0))  # blue on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: view it rotated 90 degrees clockwise
    for folder in ("database", "queries"):
        (tmp_path / folder).mkdir()
        for number in range(2):
            pixels.save(tmp_path / folder / f"{number}.png", exif=exif)
    upright = open_rgb_image(tmp_path / "database" / "0.png")
    assert upright.size == (20, 40)  # portrait
    assert upright.getpixel((10, 2)) == (0, 0, 255)  # the stored left edge is now the top
    assert read_photo_info(tmp_path / "database" / "0.png").portrait is True
    with caplog.at_level(logging.INFO, logger="places.folders"):
        build_folder_split(tmp_path / "database", tmp_path / "queries", image_size=(480, 640))
    assert "4 of 4 images are portrait but the network input is 480x640" in caplog.text
    assert "--resize 640 480" in caplog.text


# ----------------------------------------------------------------------------------------------------------------
# bash test.sh without arguments


def _stub_repository(tmp_path: Path) -> tuple[Path, dict]:
    """A folder with test.sh and a python stand-in that prints the arguments test.sh passes to test.py."""
    shutil.copy(REPO_ROOT / "test.sh", tmp_path / "test.sh")
    stub = tmp_path / "python_stub"
    stub.write_text('#!/bin/sh\necho "ARGS: $*"\n')
    stub.chmod(0o755)
    return tmp_path / "test.sh", {**os.environ, "PYTHON": str(stub)}


def _demo_run(root: Path, name: str, finished: bool, mtime: float) -> Path:
    folder = root / "logs" / "toy_world_demo" / name / "reranker"
    folder.mkdir(parents=True)
    (folder / "best.pth").write_bytes(b"weights")
    if finished:
        (folder / "results.json").write_text("{}")
        os.utime(folder / "results.json", (mtime, mtime))
    return folder / "best.pth"


def test_test_sh_without_arguments_uses_the_newest_finished_demo_model(tmp_path):
    script, environment = _stub_repository(tmp_path)
    missing = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=environment, timeout=60)
    assert missing.returncode == 1 and "ARGS" not in missing.stdout
    assert missing.stderr.count("\n") == 1 and "run 'bash train_reranking.sh'" in missing.stderr
    _demo_run(tmp_path, "2026-01-02_00-00-00", finished=True, mtime=1_000)
    newest = _demo_run(tmp_path, "2026-01-01_00-00-00", finished=True, mtime=2_000)  # finished last
    _demo_run(tmp_path, "2026-01-03_00-00-00", finished=False, mtime=0)  # still training
    found = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=environment, timeout=60)
    relative = newest.relative_to(tmp_path).as_posix()
    assert found.returncode == 0, found.stderr
    assert f"evaluating the toy-world demo's model {relative}" in found.stdout
    assert f"--resume {relative}" in found.stdout and "--num_preds_to_save 5" in found.stdout
    assert "--rerank_pictures 3" in found.stdout
    given = subprocess.run(
        ["bash", str(script), "--resume", "x.pth"], capture_output=True, text=True, env=environment, timeout=60
    )
    assert given.stdout.strip() == "ARGS: -u test.py --resume x.pth"
