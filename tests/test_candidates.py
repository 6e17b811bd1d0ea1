"""Shortlists from a file: predictions.csv, the plain CSV and pairs files map to database indices of a split, and
every file that does not fit is refused naming the file, the line and the value."""

import csv
import logging

import numpy as np
import pytest

from candidates import PREDICTIONS_HEADER, CandidatesError, read_candidates, write_candidates
from places.index import PlaceIndex

DATABASE_NUM, QUERIES_NUM = 12, 5


@pytest.fixture
def index(tmp_path) -> PlaceIndex:
    """A toy split: 12 database images and 5 queries (the files need not exist to match paths)."""
    return PlaceIndex(
        "toy/test",
        tmp_path / "split",
        [f"database/@{i}@0@.jpg" for i in range(DATABASE_NUM)],
        [f"queries/@{q}@5@.jpg" for q in range(QUERIES_NUM)],
        None,
        None,
        None,
    )


def random_shortlist(seed: int, k: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(DATABASE_NUM)[:k] for _ in range(QUERIES_NUM)]).astype(np.int64)


def write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("seed", range(4))
def test_the_plain_csv_round_trips(index, tmp_path, seed):
    shortlist = random_shortlist(seed, k=1 + seed * 3)
    write_candidates(tmp_path / "shortlist.csv", index, shortlist)
    read = read_candidates(tmp_path / "shortlist.csv", index)
    assert read.dtype == np.int64 and np.array_equal(read, shortlist)


def test_predictions_csv_gives_its_global_or_reranked_rows(index, tmp_path):
    global_ranks, reranked_ranks = random_shortlist(0, 6), random_shortlist(1, 6)
    with open(tmp_path / "predictions.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(PREDICTIONS_HEADER)
        for ranking, shortlist in (("global", global_ranks), ("reranked", reranked_ranks)):
            for query, row in enumerate(shortlist):
                paths = "|".join(index.database_paths[i] for i in row)
                writer.writerow([query, index.queries_paths[query], ranking, "", paths])
    assert np.array_equal(read_candidates(tmp_path / "predictions.csv", index), global_ranks)
    assert np.array_equal(read_candidates(tmp_path / "predictions.csv", index, ranking="reranked"), reranked_ranks)


def test_a_pairs_file_keeps_each_querys_line_order(index, tmp_path):
    shortlist = random_shortlist(2, 4)
    lines = ["# query database distance"]
    for rank in range(4):  # interleaved queries: a query's candidates are its lines in order
        for query in reversed(range(QUERIES_NUM)):
            lines.append(f"{index.queries_paths[query]} {index.database_paths[shortlist[query, rank]]} {rank}.5")
    assert np.array_equal(read_candidates(write_lines(tmp_path / "pairs.txt", lines), index), shortlist)


def test_absolute_paths_under_the_root_and_dotted_paths_match(index, tmp_path):
    shortlist = random_shortlist(3, 3)
    lines = []
    for query, row in enumerate(shortlist):
        database = [str(index.root / index.database_paths[i]) for i in row]
        lines.append(",".join([f"./{index.queries_paths[query]}", *database]))
    assert np.array_equal(read_candidates(write_lines(tmp_path / "a.csv", lines), index), shortlist)


def test_rows_of_different_lengths_are_cut_to_the_shortest_with_a_warning(index, tmp_path, caplog):
    shortlist = random_shortlist(4, 8)
    lines = [
        ",".join([index.queries_paths[q]] + [index.database_paths[i] for i in row[: 8 - q]])
        for q, row in enumerate(shortlist)
    ]
    with caplog.at_level(logging.WARNING):
        read = read_candidates(write_lines(tmp_path / "ragged.csv", lines), index, min_candidates=4)
    assert np.array_equal(read, shortlist[:, :4])
    assert "cut to 4, the length of line 5" in caplog.text


def test_a_row_shorter_than_the_candidates_to_rerank_is_refused(index, tmp_path):
    write_candidates(tmp_path / "short.csv", index, random_shortlist(5, 3))
    with pytest.raises(CandidatesError, match=r"short\.csv:\d+: a query has 3 candidates, fewer than the 5 to rerank"):
        read_candidates(tmp_path / "short.csv", index, min_candidates=5)
    # asking for more than the database holds asks for the whole database
    write_candidates(tmp_path / "all.csv", index, random_shortlist(5, DATABASE_NUM))
    assert read_candidates(tmp_path / "all.csv", index, min_candidates=100).shape == (QUERIES_NUM, DATABASE_NUM)


def plain_lines(index, shortlist) -> list[str]:
    return [
        ",".join([index.queries_paths[q]] + [index.database_paths[i] for i in row]) for q, row in enumerate(shortlist)
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda lines: lines.__setitem__(2, lines[2] + ",database/nowhere.jpg"),
            r"bad\.csv:3: 'database/nowhere\.jpg'"
            r" is not a database image of toy/test",
        ),
        (
            lambda lines: lines.__setitem__(1, "queries/ghost.jpg," + lines[1].split(",", 1)[1]),
            r"bad\.csv:2: query 'queries/ghost\.jpg' is not a query of toy/test",
        ),
        (
            lambda lines: lines.append(lines[0]),
            r"bad\.csv:6: query 'queries/@0@5@\.jpg' is given again \(first on "
            r"line 1\)",
        ),
        (
            lambda lines: lines.pop(3),
            r"bad\.csv: 1 of the 5 queries of toy/test have no row, e\.g\. "
            r"'queries/@3@5@\.jpg'",
        ),
        (
            lambda lines: lines.__setitem__(0, lines[0] + "," + lines[0].split(",")[1]),
            r"bad\.csv:1: query "
            r"'queries/@0@5@\.jpg' lists a candidate twice",
        ),
        (lambda lines: lines.__setitem__(4, lines[4].replace(",", ",,", 1)), r"bad\.csv:5: empty path in column 2"),
    ],
    ids=["unknown database path", "unknown query", "query twice", "query missing", "candidate twice", "empty cell"],
)
def test_a_file_that_does_not_fit_the_split_is_refused_naming_file_line_and_value(index, tmp_path, change, message):
    lines = plain_lines(index, random_shortlist(6, 4))
    change(lines)
    with pytest.raises(CandidatesError, match=message) as error:
        read_candidates(write_lines(tmp_path / "bad.csv", lines), index)
    assert "\n" not in str(error.value)


def test_unreadable_or_empty_files_and_bad_predictions_rows_are_refused(index, tmp_path):
    with pytest.raises(CandidatesError, match="candidates file not found"):
        read_candidates(tmp_path / "missing.csv", index)
    with pytest.raises(CandidatesError, match="no candidates found"):
        read_candidates(write_lines(tmp_path / "empty.csv", ["# nothing", ""]), index)
    header = ",".join(PREDICTIONS_HEADER)
    with pytest.raises(CandidatesError, match=r"p\.csv:2: expected the 5 columns"):
        read_candidates(write_lines(tmp_path / "p.csv", [header, "0,queries/@0@5@.jpg,global"]), index)
    with pytest.raises(CandidatesError, match=r"q\.csv:2: ranking 'best' is neither"):
        read_candidates(
            write_lines(tmp_path / "q.csv", [header, "0,queries/@0@5@.jpg,best,,database/@0@0@.jpg"]), index
        )
    with pytest.raises(CandidatesError, match=r"pairs\.txt:1: expected 'query database \[score\]'"):
        read_candidates(write_lines(tmp_path / "pairs.txt", ["queries/@0@5@.jpg"]), index)
