"""The outputs stage on hand-made evaluations: the recalls of the reranked row, report.html and when it is written,
the console's summary line."""

import json

import numpy as np
import pytest
from PIL import Image

from config import OutputOptions
from evaluation import Evaluation
from metrics import recall_at_n
from outputs import (
    msls_maps_in_reach,
    read_top1_hits,
    recalls_by_name,
    recalls_table,
    report_data,
    summary_text,
    write_outputs,
)
from places.index import PlaceIndex
from report import changes_summary, reranking_changes


def small_index(folder, positives) -> PlaceIndex:
    """Eight database images and four queries of flat colours, with the given positives (None: no ground truth)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"database/d{i}.jpg" for i in range(8)] + [f"queries/q{i}.jpg" for i in range(4)]
    for number, name in enumerate(names):
        (folder / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (64, 48), (30 * number % 255, 90, 160)).save(folder / name)
    return PlaceIndex("hand/test", folder, names[:8], names[8:], None, None, positives)


POSITIVES = [np.array([0]), np.array([1]), np.array([2]), np.array([7])]


def hand_evaluation(positives, rerank_top: int = 2, recall_values=(1, 2, 5)) -> Evaluation:
    """K = 6 global candidates per query, the first ``rerank_top`` reranked: query 0 fixed (its positive moves from
    rank 2 to 1), query 1 broken, query 2 unchanged right, query 3's positive at global rank 5, past the reranker."""
    global_predictions = np.array([[3, 0, 4, 5, 6, 1], [1, 3, 4, 5, 6, 0], [2, 3, 4, 5, 6, 0], [3, 4, 5, 6, 7, 0]])
    reranked_predictions = global_predictions.copy()
    reranked_predictions[:2, :rerank_top] = reranked_predictions[:2, :rerank_top][:, ::-1]
    recalls = (None, None)
    if positives is not None:
        recalls = tuple(recall_at_n(p, positives, recall_values) for p in (global_predictions, reranked_predictions))
    return Evaluation(
        global_predictions=global_predictions,
        global_distances=np.zeros(global_predictions.shape, np.float32),
        reranked_predictions=reranked_predictions,
        rerank_scores=np.zeros((4, rerank_top), np.float32),
        rerank_top=rerank_top,
        global_recalls=recalls[0],
        reranked_recalls=recalls[1],
        timings={},
        store_bytes_per_image=0,
    )


def test_the_reranked_row_leaves_out_recalls_past_the_reranked_candidates():
    """With rerank_top 2 and K = 6 the reranked order past rank 2 is the global one: the reference kept only the
    reranked candidates, so R@5 of the reranked row is '-' in the table and null in results.json."""
    evaluation = hand_evaluation(POSITIVES)
    assert evaluation.reranked_recalls[5] == 100.0  # what the evaluation counts, the global order included
    by_name = recalls_by_name(evaluation)
    assert by_name["reranked"] == {"R@1": 50.0, "R@2": 75.0, "R@5": None}
    assert by_name["global"] == {"R@1": 50.0, "R@2": 75.0, "R@5": 100.0}
    table = recalls_table(evaluation).splitlines()
    assert table[2].split() == ["reranked", "50.00", "75.00", "-"]
    assert table[3] == "reranked R@5: '-', past the 2 reranked candidates (the global order continues there)"


def test_every_recall_is_kept_when_the_whole_shortlist_is_reranked():
    evaluation = hand_evaluation(POSITIVES, rerank_top=6, recall_values=(1, 5, 10))
    assert None not in recalls_by_name(evaluation)["reranked"].values()
    assert "past the" not in recalls_table(evaluation)
    assert None not in msls_maps_in_reach(evaluation, POSITIVES)["reranked"].values()


def test_the_msls_map_of_the_reranked_row_stops_where_its_recalls_do():
    """mAP@k past the reranked candidates would score the global order under the reranker's name: None there, as
    R@N; k beyond the predictions (K = 6) is left out of both rows."""
    maps = msls_maps_in_reach(hand_evaluation(POSITIVES, recall_values=(1, 2, 5, 10)), POSITIVES)
    assert list(maps["global"]) == ["mAP@1", "mAP@2", "mAP@5"]
    assert maps["reranked"]["mAP@5"] is None and maps["global"]["mAP@5"] is not None
    assert maps["reranked"]["mAP@1"] == 50.0 and maps["global"]["mAP@1"] == 50.0


@pytest.mark.parametrize(
    "report, num_preds, rerank_pictures, written",
    [
        ("auto", 0, 0, False),
        ("auto", 2, 0, True),
        ("auto", 0, 2, True),
        ("always", 0, 0, True),
        ("never", 2, 2, False),
    ],
)
def test_the_report_is_written_when_pictures_are_saved_or_when_asked(report, num_preds, rerank_pictures, written):
    options = OutputOptions("toy_world", num_preds, 0, False, rerank_pictures, report)
    assert options.writes_report == written


def test_write_outputs_writes_the_report_beside_results_json(tmp_path):
    index = small_index(tmp_path / "split", POSITIVES)
    evaluation = hand_evaluation(POSITIVES)
    results = {"reranking_changes": reranking_changes(*_rankings(evaluation), POSITIVES, 2)}
    write_outputs(tmp_path / "run", index, evaluation, results, OutputOptions("toy_world", report="always"))
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Reranking report: hand/test" in page and "<td>—</td>" in page
    assert "no reranked value for R@5: past the 2 reranked candidates" in page
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    assert results["reranking_changes"]["fixed"] == 1 and results["reranking_changes"]["broken"] == 1
    write_outputs(tmp_path / "quiet", index, evaluation, {}, OutputOptions("toy_world"))
    assert not (tmp_path / "quiet" / "report.html").exists()


def test_without_ground_truth_the_report_is_the_gallery_and_no_line_is_printed(tmp_path):
    index = small_index(tmp_path / "split", None)
    evaluation = hand_evaluation(None)
    results = {"reranking_changes": reranking_changes(*_rankings(evaluation), None, 2)}
    assert results["reranking_changes"] is None
    write_outputs(tmp_path / "run", index, evaluation, results, OutputOptions("folders", report="always"))
    page = (tmp_path / "run" / "report.html").read_text()
    assert "No ground truth" in page and "What reranking changed" not in page
    assert summary_text(index, evaluation, results).splitlines()[-1] == "no ground truth for this split: no recalls"


def test_the_summary_ends_with_what_reranking_changed(tmp_path):
    index = small_index(tmp_path / "split", POSITIVES)
    evaluation = hand_evaluation(POSITIVES)
    changes = reranking_changes(*_rankings(evaluation), POSITIVES, 2)
    summary = summary_text(index, evaluation, {"reranking_changes": changes})
    assert summary.splitlines()[-1] == changes_summary(changes)
    assert changes_summary(changes).startswith("reranking fixed 1 query and broke 1 ")


def test_the_report_data_holds_the_split_the_recalls_in_reach_and_the_pictures(tmp_path):
    index = small_index(tmp_path / "split", POSITIVES)
    evaluation = hand_evaluation(POSITIVES)
    data = report_data(index, evaluation, {1: tmp_path / "picture.png"})
    assert data.split_name == "hand/test" and data.rerank_top == 2
    assert [p.name for p in data.query_paths] == ["q0.jpg", "q1.jpg", "q2.jpg", "q3.jpg"]
    assert len(data.database_paths) == 8 and data.database_paths[0].is_absolute()
    assert data.reranked_recalls == {1: 50.0, 2: 75.0, 5: None}
    assert data.correspondence_pictures == {1: tmp_path / "picture.png"}


def test_reranking_pictures_need_the_model(tmp_path):
    index = small_index(tmp_path / "split", POSITIVES)
    with pytest.raises(ValueError, match="need the model"):
        write_outputs(
            tmp_path / "run", index, hand_evaluation(POSITIVES), {}, OutputOptions("toy_world", 0, 0, False, 1)
        )


def _rankings(evaluation: Evaluation) -> tuple[np.ndarray, np.ndarray]:
    return evaluation.global_predictions, evaluation.reranked_predictions


def test_top1_hits_are_read_per_ranking_in_query_order(tmp_path):
    """predictions.csv rows in any order -> per ranking, query q's top-1 correctness at position q; a file whose two
    rankings name different queries is refused, naming it."""
    path = tmp_path / "predictions.csv"
    header = "query_index,query_path,ranking,first_correct_rank,database_paths\n"
    rows = ["1,q1.jpg,global,,a|b", "0,q0.jpg,global,1,a|b", "0,q0.jpg,reranked,2,b|a", "1,q1.jpg,reranked,1,a|b"]
    path.write_text(header + "\n".join(rows) + "\n")
    hits = read_top1_hits(path)
    assert hits["global"].tolist() == [True, False] and hits["reranked"].tolist() == [False, True]
    path.write_text(header + "\n".join(rows[:3]) + "\n")
    with pytest.raises(ValueError, match="predictions.csv: the global and reranked rows name different queries"):
        read_top1_hits(path)
