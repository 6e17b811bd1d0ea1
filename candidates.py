"""Shortlists made by another tool, to rerank (``--candidates FILE``): this project's ``predictions.csv``, a plain
CSV (the query path, then the database paths in rank order), or a pairs file (one ``query database [score]`` line per
candidate, as VPR-methods-evaluation's save.py save_pairsfile writes). ``read_candidates`` matches every path to a
PlaceIndex and returns the ranked database indices; the formats and the rules are in docs/retrievers.md.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from places.index import PlaceIndex
from util import PRGSError, atomic_write_text

logger = logging.getLogger(__name__)

PREDICTIONS_HEADER = ["query_index", "query_path", "ranking", "first_correct_rank", "database_paths"]
RANKINGS = ("global", "reranked")


class CandidatesError(PRGSError, ValueError):
    """A candidates file that does not fit the split; the message names the file, the line and the value."""


@dataclass
class _Row:
    line: int  # 1-based line of the file where the query's row (or first pair) is
    query: str
    database: list[str]


def read_candidates(
    path: str | Path, index: PlaceIndex, min_candidates: int = 1, ranking: str = "global"
) -> np.ndarray:
    """The ranked shortlist of every query of ``index`` in ``path`` -> (Nq, K) int64 database indices, row q for
    query q of the index.

    Paths are matched relative to ``index.root`` (absolute paths under it are accepted). K is the shortest row's
    length: longer rows are cut to it, with a warning naming the shortest row. Refused, naming the file, the line
    and the value: an unknown query or database path, a query given twice or missing, a candidate repeated in a
    row, and rows with fewer than ``min(min_candidates, index.database_num)`` candidates (what reranking asks).
    ``ranking``: which rows of a predictions.csv to read ("global" or "reranked").
    """
    path = Path(path)
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    if not path.is_file():
        raise CandidatesError(f"candidates file not found: {path}")
    rows = _read_rows(path, ranking)
    if not rows:
        raise CandidatesError(f"{path}: no candidates found (docs/retrievers.md describes the formats)")
    shortlist = _matched(path, rows, index)
    return _cut_to_shortest(path, rows, shortlist, min(min_candidates, index.database_num))


def write_candidates(path: str | Path, index: PlaceIndex, predictions: np.ndarray) -> None:
    """The plain CSV format (atomically): per query of ``index``, its path then the database paths of its row of
    ``predictions`` (Nq, K) in rank order, all relative to ``index.root``."""
    if predictions.ndim != 2 or len(predictions) != index.queries_num:
        raise ValueError(f"predictions must be ({index.queries_num}, K), got {predictions.shape}")
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    for query, row in enumerate(predictions):
        writer.writerow([index.queries_paths[query]] + [index.database_paths[i] for i in row])
    atomic_write_text(path, text.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# Reading the three formats


def _read_rows(path: Path, ranking: str) -> list[_Row]:
    """The file's rows as (line, query, ranked database paths), in file order, whatever its format."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CandidatesError(f"cannot read candidates file {path}: {error}") from error
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip() and not line.startswith("#")]
    if not numbered:
        return []
    first_cells = next(csv.reader([numbered[0][1]]))
    if [cell.strip() for cell in first_cells] == PREDICTIONS_HEADER:
        return _predictions_rows(path, numbered[1:], ranking)
    if "," in numbered[0][1]:
        return _plain_rows(path, numbered)
    return _pairs_rows(path, numbered)


def _predictions_rows(path: Path, numbered: list[tuple[int, str]], ranking: str) -> list[_Row]:
    """Rows of this project's predictions.csv (docs/outputs.md) of the chosen ranking."""
    rows = []
    for number, cells in _csv_cells(numbered):
        if len(cells) != len(PREDICTIONS_HEADER):
            raise CandidatesError(
                f"{path}:{number}: expected the {len(PREDICTIONS_HEADER)} columns of predictions.csv "
                f"({', '.join(PREDICTIONS_HEADER)}), got {len(cells)}"
            )
        if cells[2] not in RANKINGS:
            raise CandidatesError(f"{path}:{number}: ranking {cells[2]!r} is neither 'global' nor 'reranked'")
        if cells[2] == ranking:
            rows.append(_Row(number, cells[1], [p for p in cells[4].split("|") if p]))
    return rows


def _plain_rows(path: Path, numbered: list[tuple[int, str]]) -> list[_Row]:
    """Rows of the plain CSV: query path, then database paths in rank order (trailing empty cells ignored)."""
    rows = []
    for number, cells in _csv_cells(numbered):
        while cells and not cells[-1]:
            cells.pop()
        if "" in cells:
            raise CandidatesError(f"{path}:{number}: empty path in column {cells.index('') + 1}")
        rows.append(_Row(number, cells[0], cells[1:]))
    return rows


def _pairs_rows(path: Path, numbered: list[tuple[int, str]]) -> list[_Row]:
    """Rows of a pairs file: 'query database [score]' lines, a query's candidates in the order of their lines."""
    rows: dict[str, _Row] = {}
    for number, line in numbered:
        fields = line.split()
        if len(fields) not in (2, 3):
            raise CandidatesError(
                f"{path}:{number}: expected 'query database [score]' (paths without spaces), got {len(fields)} fields"
            )
        rows.setdefault(fields[0], _Row(number, fields[0], [])).database.append(fields[1])
    return list(rows.values())


def _csv_cells(numbered: list[tuple[int, str]]) -> list[tuple[int, list[str]]]:
    """Each numbered line parsed as one CSV row, cells stripped."""
    return [(number, [cell.strip() for cell in next(csv.reader([line]))]) for number, line in numbered]


# ----------------------------------------------------------------------------------------------------------------
# Matching paths to the split


def _matched(path: Path, rows: list[_Row], index: PlaceIndex) -> list[np.ndarray]:
    """Per query of index (in its order), the database indices of its row; refuses unknown, repeated or missing
    queries and unknown or repeated candidates."""
    query_of = {p: q for q, p in enumerate(index.queries_paths)}
    database_of = {p: i for i, p in enumerate(index.database_paths)}
    found: dict[int, tuple[int, np.ndarray]] = {}
    for row in rows:
        query = query_of.get(_relative(row.query, index.root))
        if query is None:
            raise CandidatesError(f"{path}:{row.line}: query {row.query!r} is not a query of {_split(index)}")
        if query in found:
            raise CandidatesError(
                f"{path}:{row.line}: query {row.query!r} is given again (first on line {found[query][0]})"
            )
        ids = []
        for value in row.database:
            database_id = database_of.get(_relative(value, index.root))
            if database_id is None:
                raise CandidatesError(f"{path}:{row.line}: {value!r} is not a database image of {_split(index)}")
            ids.append(database_id)
        ids = np.asarray(ids, dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            repeated = row.database[int(np.flatnonzero(np.unique(ids, return_counts=True)[1] > 1)[0])]
            raise CandidatesError(f"{path}:{row.line}: query {row.query!r} lists a candidate twice, e.g. {repeated!r}")
        found[query] = (row.line, ids)
    missing = [q for q in range(index.queries_num) if q not in found]
    if missing:
        raise CandidatesError(
            f"{path}: {len(missing)} of the {index.queries_num} queries of {index.name} have no row, "
            f"e.g. {index.queries_paths[missing[0]]!r}"
        )
    return [found[q][1] for q in range(index.queries_num)]


def _cut_to_shortest(path: Path, rows: list[_Row], shortlist: list[np.ndarray], needed: int) -> np.ndarray:
    """(Nq, K) with K the shortest row's length; CandidatesError when a row has fewer than needed."""
    lengths = np.array([len(ids) for ids in shortlist])
    line_of = {len(row.database): row.line for row in rows}  # a line of each length, for the messages
    shortest = int(lengths.min())
    if shortest < needed:
        raise CandidatesError(
            f"{path}:{line_of[shortest]}: a query has {shortest} candidates, fewer than the {needed} to rerank "
            f"(rerank fewer, or give a longer shortlist)"
        )
    if lengths.max() > shortest:
        logger.warning(
            "%s: rows have %d to %d candidates; all are cut to %d, the length of line %d",
            path,
            shortest,
            int(lengths.max()),
            shortest,
            line_of[shortest],
        )
    return np.stack([ids[:shortest] for ids in shortlist])  # (Nq, K)


def _relative(value: str, root: Path) -> str:
    """value as a posix path relative to root ('./a/b' -> 'a/b'; an absolute path under root made relative)."""
    candidate = Path(value)
    if candidate.is_absolute():
        try:
            candidate = candidate.relative_to(root)
        except ValueError:
            return candidate.as_posix()
    return candidate.as_posix()


def _split(index: PlaceIndex) -> str:
    return f"{index.name} (root {index.root})"
