"""Native MSLS: CSV reading, the official filters, per-city positives, the cache, metrics, submission file."""

import csv
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets_ws import SplitRequest, load_split
from metrics import recall_at_n
from places import msls
from places.index import DatasetError
from places.msls import build_msls_split
from places.msls_protocol import msls_average_precision_at_k, msls_map_at_k, write_msls_submission

# Column layouts of the real files (mapillary_sls reads them with pandas, index_col=0).
SEQ_INFO_HEADER = ["", "key", "sequence_key", "frame_number"]
POSTPROCESSED_HEADER = ["", "key", "easting", "northing", "unique_cluster", "control_panel", "night", "view_direction"]
RAW_HEADER = ["", "key", "lon", "lat", "ca", "captured_at", "pano"]
SUBTASK_COLUMNS = ["all", "s2w", "w2s", "o2n", "n2o", "d2n", "n2d"]


def image(key, east=0.0, north=0.0, pano=False, in_all=True, night=False, view="Forward"):
    return dict(key=key, east=east, north=north, pano=pano, in_all=in_all, night=night, view=view)


# cph and sf share UTM numbers on purpose: cq0 is 3 m from sf's sdb1 and must not match it.
CITIES = {
    "cph": {
        "database": [
            image("cdb0", 1000, 1000),
            image("cdb1", 1010, 1000),
            image("cdb2", 1000, 1100, pano=True),
            image("cdb3", 2000, 2000, in_all=False),
        ],
        "query": [
            image("cq0", 1005, 1000),  # positives cdb0, cdb1 (a tie at 5 m: index order)
            image("cq1", 1000, 1098),  # only near the panorama cdb2: dropped
            image("cq2", 2000, 2001),  # only near cdb3, outside subtask 'all': dropped
            image("cq3", 1000, 1000, pano=True),  # panorama: dropped
            image("cq4", 1000, 1020, in_all=False),
        ],  # outside subtask 'all': dropped
    },
    "sf": {
        "database": [image("sdb0", 3000, 3000), image("sdb1", 1003, 1000)],
        "query": [image("sq0", 3000, 3010), image("sq1", 1020, 1000)],  # sq1: sdb1 only, not cph's cdb*
    },
    "london": {
        "database": [image("ldb0", 0, 0), image("ldb1", 8, 0), image("ldb2", 20, 0), image("ldb3", 0, 50, pano=True)],
        "query": [
            image("lq0", 1, 0),  # hard ldb0 ldb1; soft + ldb2
            image("lq1", 0, 45),  # only near the panorama ldb3: dropped
            image("lq2", 15, 0, night=True),  # hard ldb2 ldb1; soft + ldb0
            image("lq3", 0, 18),
        ],  # soft ldb0 but no hard positive: dropped
    },
    "boston": {
        "database": [image("bdb0", 0, 0, in_all=False)],  # train applies no subtask filter
        "query": [image("bq0", 2, 0, view="Sideways")],  # bdb0 only, never london's ldb0
    },
    "miami": {
        "database": [image("mdb0"), image("mdb1", in_all=False)],
        "query": [image("mq0"), image("mq1", in_all=False)],
    },
}
TRAIN_CITIES = ["london", "boston"]


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def make_msls(datasets_folder: Path) -> Path:
    """The cities above in the MSLS layout, CSVs in the real column layout; returns <datasets_folder>/msls."""
    for city, sides in CITIES.items():
        is_test = city == "miami"
        for side, images in sides.items():
            folder = datasets_folder / "msls" / ("test" if is_test else "train_val") / city / side
            (folder / "images").mkdir(parents=True)
            for row, im in enumerate(images):
                Image.new("RGB", (8, 6), (row * 40 % 255, 90, 30)).save(folder / "images" / f"{im['key']}.jpg")
            write_csv(
                folder / "seq_info.csv",
                SEQ_INFO_HEADER,
                [[row, im["key"], f"seq_{city}", row] for row, im in enumerate(images)],
            )
            subtasks = [[im["in_all"]] + [False] * 6 for im in images]
            if city == "sf":  # no key column: rows align with seq_info.csv
                write_csv(
                    folder / "subtask_index.csv", [""] + SUBTASK_COLUMNS, [[row] + s for row, s in enumerate(subtasks)]
                )
            else:
                write_csv(
                    folder / "subtask_index.csv",
                    ["", "key"] + SUBTASK_COLUMNS,
                    [[row, im["key"]] + s for row, (im, s) in enumerate(zip(images, subtasks))],
                )
            if is_test:
                continue
            rows = [
                [row, im["key"], f"{im['east']:.3f}", f"{im['north']:.3f}", 0, False, im["night"], im["view"]]
                for row, im in enumerate(images)
            ]
            write_csv(folder / "postprocessed.csv", POSTPROCESSED_HEADER, rows[::-1])  # matched by key, any order
            write_csv(
                folder / "raw.csv",
                RAW_HEADER,
                [
                    [row, im["key"], 12.5, 55.6, 90.0, "2016-01-01 10:00:00", im["pano"]]
                    for row, im in enumerate(images)
                ],
            )
    return datasets_folder / "msls"


@pytest.fixture
def msls_folder(tmp_path) -> Path:
    """The datasets folder holding msls/, with its cache folder and the user cache isolated in tmp_path."""
    make_msls(tmp_path / "data")
    return tmp_path / "data"


@pytest.fixture(autouse=True)
def _user_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))


def keys_of(index, positives):
    return [[index.database_keys[i] for i in p] for p in positives]


def test_val_follows_the_official_protocol(msls_folder):
    index = build_msls_split(msls_folder, "val")
    assert index.name == "msls/val" and index.root == msls_folder / "msls"
    assert index.database_keys == ["cdb0", "cdb1", "sdb0", "sdb1"]  # panorama and non-'all' images dropped
    assert index.queries_keys == ["cq0", "sq0", "sq1"]  # and queries without a positive
    assert keys_of(index, index.soft_positives_per_query) == [["cdb0", "cdb1"], ["sdb0"], ["sdb1"]]
    assert index.hard_positives_per_query is None
    assert index.database_paths[0] == "train_val/cph/database/images/cdb0.jpg"
    assert index.queries_groups == ["cph", "sf", "sf"]
    np.testing.assert_allclose(index.queries_utms, [[1005, 1000], [3000, 3010], [1020, 1000]])
    assert all(index.absolute_path(i).is_file() for i in range(len(index)))
    assert repr(index) == "< msls/val: 4 database, 3 queries >"


def test_train_hard_and_soft_positives_per_city(msls_folder, caplog):
    with caplog.at_level(logging.INFO, logger="places.index"):
        index = build_msls_split(msls_folder, "train", cities=TRAIN_CITIES)
    assert index.name == "msls/train-london+boston"
    assert index.database_keys == ["ldb0", "ldb1", "ldb2", "bdb0"]
    assert index.queries_keys == ["lq0", "lq2", "bq0"]
    assert "dropped 2 of 5 queries without a hard positive" in caplog.text
    assert keys_of(index, index.hard_positives_per_query) == [["ldb0", "ldb1"], ["ldb2", "ldb1"], ["bdb0"]]
    assert keys_of(index, index.soft_positives_per_query) == [
        ["ldb0", "ldb1", "ldb2"],
        ["ldb2", "ldb1", "ldb0"],
        ["bdb0"],
    ]
    np.testing.assert_array_equal(index.queries_attributes["night"], [False, True, False])
    np.testing.assert_array_equal(index.queries_attributes["sideways"], [False, False, True])


def test_test_split_has_keys_and_no_ground_truth(msls_folder):
    index = build_msls_split(msls_folder, "test", cities=["miami"])
    assert index.database_keys == ["mdb0"] and index.queries_keys == ["mq0"]
    assert index.soft_positives_per_query is None and index.queries_utms is None
    assert index.database_paths == ["test/miami/database/images/mdb0.jpg"]


def test_missing_cities_and_folders_are_named(msls_folder, tmp_path):
    with pytest.raises(DatasetError, match=r"city 'trondheim' of split 'train' not found.*cities="):
        build_msls_split(msls_folder, "train")
    with pytest.raises(DatasetError, match=r"MSLS folder .*msls not found"):
        build_msls_split(tmp_path / "elsewhere", "val")
    with pytest.raises(DatasetError, match=r"unknown MSLS split 'dev'"):
        build_msls_split(msls_folder, "dev")
    (msls_folder / "msls" / "train_val" / "sf" / "query" / "raw.csv").unlink()
    with pytest.raises(DatasetError, match=r"sf/query/raw\.csv not found"):
        build_msls_split(msls_folder, "val")


def test_bad_csv_content_names_file_and_value(msls_folder):
    raw = msls_folder / "msls" / "train_val" / "cph" / "database" / "raw.csv"
    raw.write_text(raw.read_text().replace("False", "maybe", 1))
    with pytest.raises(DatasetError, match=r"cph/database/raw\.csv .*'maybe' is not a boolean"):
        build_msls_split(msls_folder, "val")
    post = msls_folder / "msls" / "train_val" / "sf" / "query" / "postprocessed.csv"
    write_csv(post, ["", "key", "utm"], [[0, "sq0", "x"], [1, "sq1", "y"]])
    with pytest.raises(DatasetError, match=r"sf/query/postprocessed\.csv has no column \['easting', 'northing'\]"):
        build_msls_split(msls_folder, "train", cities=["sf"])


def test_second_build_loads_from_the_cache(msls_folder, caplog):
    first = build_msls_split(msls_folder, "val")
    assert (msls_folder / "msls" / "prgs_index" / "msls_val.npz").is_file()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="places.msls"):
        second = build_msls_split(msls_folder, "val")
    assert "loaded < msls/val: 4 database, 3 queries > from the cache" in caplog.text
    assert "building" not in caplog.text
    assert_same_index(first, second)
    train = build_msls_split(msls_folder, "train", cities=TRAIN_CITIES)
    assert_same_index(train, build_msls_split(msls_folder, "train", cities=TRAIN_CITIES))


def assert_same_index(a, b):
    assert (a.name, a.root, a.database_paths, a.queries_paths) == (b.name, b.root, b.database_paths, b.queries_paths)
    assert (a.database_keys, a.queries_keys, a.database_groups, a.queries_groups) == (
        b.database_keys,
        b.queries_keys,
        b.database_groups,
        b.queries_groups,
    )
    np.testing.assert_array_equal(a.database_utms, b.database_utms)
    np.testing.assert_array_equal(a.queries_utms, b.queries_utms)
    for kind in ("soft", "hard"):
        pa, pb = getattr(a, f"{kind}_positives_per_query"), getattr(b, f"{kind}_positives_per_query")
        assert (pa is None) == (pb is None)
        for x, y in zip(pa or [], pb or []):
            np.testing.assert_array_equal(x, y)
            assert y.dtype == np.int64
    assert a.queries_attributes.keys() == b.queries_attributes.keys()


def test_edited_csv_makes_the_cache_stale(msls_folder, caplog):
    build_msls_split(msls_folder, "val")
    post = msls_folder / "msls" / "train_val" / "sf" / "database" / "postprocessed.csv"
    post.write_text(post.read_text().replace("3000.000,3000.000", "3000.000,3500.000"))  # sdb0 moves 500 m
    with caplog.at_level(logging.INFO, logger="places.msls"):
        index = build_msls_split(msls_folder, "val")
    assert "is stale" in caplog.text
    assert index.queries_keys == ["cq0", "sq1"]  # sq0 lost its only positive


def test_truncated_cache_is_rebuilt(msls_folder, caplog):
    first = build_msls_split(msls_folder, "val")
    cache = msls_folder / "msls" / "prgs_index" / "msls_val.npz"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    with caplog.at_level(logging.INFO, logger="places.msls"):
        rebuilt = build_msls_split(msls_folder, "val")
    assert "is unreadable" in caplog.text and "building the msls/val index" in caplog.text
    assert_same_index(first, rebuilt)
    assert not [p for p in cache.parent.iterdir() if p.suffix == ".tmp"]  # no temporary files left behind


@pytest.mark.parametrize(
    "field, edit, problem",
    [
        ("soft_positives_flat", lambda a: a + 4, r"field 'soft_positives_flat' holds \d+, expected values < 4 \(Nd\)"),
        ("database_city", lambda a: a + 9, r"field 'database_city' holds \d+, expected values < 2 \(C\)"),
        ("soft_positives_offsets", lambda a: a[::-1], "field 'soft_positives_offsets' must rise from 0"),
        ("queries_utms", lambda a: a[:1], "field 'queries_utms' has 1 entries along axis 0"),
    ],
)
def test_a_cache_with_wrong_values_is_rebuilt_not_used(msls_folder, caplog, field, edit, problem):
    """A cache that reads but holds values no index can have (edited by hand, written by another program) is named
    and rebuilt: its indices never reach the positives."""
    first = build_msls_split(msls_folder, "val")
    cache = msls_folder / "msls" / "prgs_index" / "msls_val.npz"
    with np.load(cache) as loaded:
        arrays = {key: loaded[key] for key in loaded.files}
    arrays[field] = edit(arrays[field])
    with open(cache, "wb") as file:
        np.savez(file, **arrays)
    with caplog.at_level(logging.INFO, logger="places.msls"):
        rebuilt = build_msls_split(msls_folder, "val")
    assert "is unreadable (FileFormatError" in caplog.text and "building the msls/val index" in caplog.text
    assert re.search(problem, caplog.text), caplog.text
    assert_same_index(first, rebuilt)


def test_moved_dataset_uses_its_cache(msls_folder, tmp_path, caplog):
    build_msls_split(msls_folder, "val")
    moved = tmp_path / "moved"
    shutil.move(str(msls_folder), str(moved))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="places.msls"):
        index = build_msls_split(moved, "val")
    assert "from the cache" in caplog.text and "building" not in caplog.text
    assert index.root == moved / "msls"
    assert all(index.absolute_path(i).is_file() for i in range(len(index)))


def test_unwritable_cache_folder_falls_back_to_the_user_cache(msls_folder, tmp_path, caplog):
    (msls_folder / "msls" / "prgs_index").write_text("a file where the cache folder should be")
    with caplog.at_level(logging.INFO, logger="places.msls"):
        build_msls_split(msls_folder, "val")
        assert "cannot write the MSLS cache" in caplog.text
        assert (tmp_path / "user_cache" / "prgs" / "msls_index" / "msls_val.npz").is_file()
        caplog.clear()
        build_msls_split(msls_folder, "val")
    assert "from the cache" in caplog.text


def test_explicit_cache_dir(msls_folder, tmp_path):
    build_msls_split(msls_folder, "test", cities=["miami"], cache_dir=tmp_path / "my_cache")
    assert len(list((tmp_path / "my_cache").glob("msls_test_*.npz"))) == 1


def test_exclude_and_skip_bad_images(msls_folder, caplog):
    sdb1 = msls_folder / "msls" / "train_val" / "sf" / "database" / "images" / "sdb1.jpg"
    sdb1.write_bytes(sdb1.read_bytes()[:100])
    with caplog.at_level(logging.INFO):
        index = load_split(SplitRequest(msls_folder, "msls", "val", skip_bad_images=True))
    assert index.excluded[0][0] == "train_val/sf/database/images/sdb1.jpg"
    assert "sdb1.jpg" in caplog.text
    assert index.database_keys == ["cdb0", "cdb1", "sdb0"]
    assert index.queries_keys == ["cq0", "sq0"]  # sq1 had only sdb1
    assert keys_of(index, index.soft_positives_per_query) == [["cdb0", "cdb1"], ["sdb0"]]


# ------------------------------------------------------------------------------------------------------------------
# Metrics and submission
# ------------------------------------------------------------------------------------------------------------------

PREDICTIONS = np.array([[0, 1, 2, 3, 4, 5], [0, 5, 4, 1, 3, 2]])
POSITIVES = [np.array([4, 5]), np.array([0, 1])]


def test_recall_at_k_by_hand():
    # query 0: first positive at rank 5; query 1: at rank 1. MSLS's recall@k is the VG benchmark's recall@N.
    assert recall_at_n(PREDICTIONS, POSITIVES, (1, 3, 5)) == {1: 50.0, 3: 50.0, 5: 100.0}
    padded = np.array([[-1, -1, 4], [0, -1, -1]])  # -1 (faiss padding) never matches
    assert recall_at_n(padded, POSITIVES, (1, 3)) == {1: 50.0, 3: 100.0}


def test_map_at_k_by_hand():
    # query 0: AP@5 = (1/5) / 2 = 0.1; AP@1 = AP@3 = 0.  query 1: AP@1 = 1; AP@3 = 1/2; AP@5 = (1/1 + 2/4) / 2 = 0.75
    result = msls_map_at_k(PREDICTIONS, POSITIVES, ks=(1, 3, 5))
    assert result == pytest.approx({1: 50.0, 3: 25.0, 5: 42.5})
    # a repeated prediction counts once: (1/1 + 2/3) / 2
    assert msls_average_precision_at_k(np.array([0, 0, 1]), np.array([0, 1]), 3) == pytest.approx(5 / 6)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match=r"ks must be in 1\.\.6"):
        msls_map_at_k(PREDICTIONS, POSITIVES, ks=(1, 10))
    with pytest.raises(ValueError, match="2 rows but there are 1 positive lists"):
        msls_map_at_k(PREDICTIONS, POSITIVES[:1], ks=(1,))
    with pytest.raises(ValueError, match=r"queries \[1\].*have none"):
        msls_map_at_k(PREDICTIONS, [np.array([4]), np.array([], dtype=np.int64)], ks=(1,))


def test_submission_file_format(tmp_path):
    path = tmp_path / "out" / "rerank.txt"
    write_msls_submission(path, ["qa", "qb"], ["d0", "d1", "d2"], np.array([[2, 0], [1, 2]]))
    assert path.read_text() == "qa d2 d0\nqb d1 d2\n"
    with pytest.raises(ValueError, match="query qb: the same database image is predicted more than once"):
        write_msls_submission(path, ["qa", "qb"], ["d0", "d1", "d2"], np.array([[2, 0], [1, 1]]))
    with pytest.raises(ValueError, match=r"query qa: predictions \[-1\] are not database indices"):
        write_msls_submission(path, ["qa", "qb"], ["d0", "d1", "d2"], np.array([[2, -1], [1, 0]]))
    assert path.read_text() == "qa d2 d0\nqb d1 d2\n"  # a refused write leaves the old file untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["rerank.txt"]


def test_submission_from_a_built_test_split(msls_folder, tmp_path):
    index = build_msls_split(msls_folder, "test", cities=["miami"])
    path = tmp_path / "submission.txt"
    write_msls_submission(path, index.queries_keys, index.database_keys, np.zeros((index.queries_num, 1), int))
    assert path.read_text() == "mq0 mdb0\n"


def test_official_city_lists():
    assert len(msls.MSLS_CITIES["train"]) == 22 and msls.MSLS_CITIES["val"] == ("cph", "sf")
    assert len(msls.MSLS_CITIES["test"]) == 6


# ------------------------------------------------------------------------------------------------------------------
# Protocol details of mapillary_sls: brute-force radius search, cities without queries, the challenge's zip
# ------------------------------------------------------------------------------------------------------------------


def _boundary_pair(query: np.ndarray) -> np.ndarray:
    """A database position near 25 m from query (UTM magnitudes) that sklearn's brute-force radius search counts as
    within 25 m and its kd-tree (exact distances) does not, found on this machine."""
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(0)
    for _ in range(10_000):
        angle, radius = rng.uniform(0, 2 * np.pi), 25 + rng.uniform(0, 3e-4)
        candidate = query + radius * np.array([np.cos(angle), np.sin(angle)])
        brute = NearestNeighbors(algorithm="brute").fit(candidate[None]).radius_neighbors(query[None], 25.0)[1][0]
        tree = NearestNeighbors(algorithm="kd_tree").fit(candidate[None]).radius_neighbors(query[None], 25.0)[1][0]
        if len(brute) == 1 and len(tree) == 0:
            return candidate
    pytest.skip("no database position where brute force and the kd-tree disagree on this machine")


def test_positives_at_the_radius_are_mapillary_sls_brute_force_ones(msls_folder):
    query = np.array([347000.123, 6176000.456])
    database = _boundary_pair(query)
    assert np.hypot(*(database - query)) > 25.0  # outside by exact arithmetic, inside by brute force
    cph = msls_folder / "msls" / "train_val" / "cph"
    rows = {"query": {"cq0": query}, "database": {"cdb0": database, "cdb1": query + 500}}
    for side, moved in rows.items():
        path = cph / side / "postprocessed.csv"
        with open(path) as file:
            table = list(csv.reader(file))
        for row in table[1:]:
            if row[1] in moved:
                row[2], row[3] = repr(float(moved[row[1]][0])), repr(float(moved[row[1]][1]))
        write_csv(path, table[0], table[1:])
    index = build_msls_split(msls_folder, "val")
    assert index.queries_keys[0] == "cq0"  # kept: brute force finds its positive, as mapillary_sls's MSLS does
    assert keys_of(index, index.soft_positives_per_query)[0] == ["cdb0"]


def test_a_city_without_queries_leaves_its_database_out(msls_folder, caplog):
    raw = msls_folder / "msls" / "train_val" / "sf" / "query" / "raw.csv"
    raw.write_text(raw.read_text().replace(",False", ",True"))  # every sf query is a panorama
    with caplog.at_level(logging.INFO, logger="places.msls"):
        index = build_msls_split(msls_folder, "val")
    assert index.database_keys == ["cdb0", "cdb1"]  # sf's database is not kept as distractors
    assert index.queries_keys == ["cq0"]
    assert "city sf keeps 0 queries and 2 database images after the filters: left out entirely" in caplog.text


def test_the_challenge_file_is_a_zip_holding_one_csv(tmp_path):
    import zipfile

    from config import OutputOptions
    from evaluation import Evaluation
    from outputs import write_outputs
    from places.index import PlaceIndex

    index = PlaceIndex("msls/test", tmp_path, ["d0.jpg", "d1.jpg"], ["q0.jpg"], None, None, None)
    predictions = np.array([[1, 0]])
    evaluation = Evaluation(
        predictions, predictions.astype(np.float32), predictions[:, ::-1], predictions, 2, None, None, {}, 0
    )
    options = OutputOptions(dataset_name="msls", num_preds_to_save=0, save_only_wrong_preds=False)
    results = {}
    write_outputs(tmp_path / "run", index, evaluation, results, options)
    assert results["msls_submission"] == {
        "global": "msls_submission_global.zip",
        "reranked": "msls_submission_reranked.zip",
    }
    for label, line in (("global", "q0 d1 d0\n"), ("reranked", "q0 d0 d1\n")):
        with zipfile.ZipFile(tmp_path / "run" / f"msls_submission_{label}.zip") as archive:
            assert archive.namelist() == [f"msls_submission_{label}.csv"]
            assert archive.read(f"msls_submission_{label}.csv").decode() == line
