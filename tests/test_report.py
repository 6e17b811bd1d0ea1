"""The report page: the numbers of what reranking changed, and report.html as a browser shows it (headless Chromium
from the system's packages, driven by selenium; nothing is downloaded)."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from metrics import recall_at_n
from report import (
    CLASSES,
    ReportData,
    ReportSettings,
    changes_summary,
    check_report_data,
    render_page,
    reranking_changes,
    shown_queries,
    write_report,
)

try:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # only the browser tests need selenium; requirements.txt installs it
    webdriver = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
IN_CI = os.environ.get("CI", "").lower() == "true"


# ----------------------------------------------------------------------------------------------------------------
# reranking_changes on hand-made predictions


def hand_made_case():
    """Five queries, K = 4, rerank_top = 3: fixed (2 -> 1), broken (1 -> 3), unchanged right, and two unchanged
    wrong whose positive is out of the reranker's reach (rank 4, none)."""
    positives = [np.array([0]), np.array([1]), np.array([2]), np.array([9]), np.array([], dtype=np.int64)]
    global_predictions = np.array([[5, 0, 6, 7], [1, 5, 6, 7], [2, 5, 6, 7], [5, 6, 7, 9], [5, 6, 7, 8]])
    reranked_predictions = np.array([[0, 5, 6, 7], [5, 6, 1, 7], [2, 5, 6, 7], [6, 5, 7, 9], [7, 6, 5, 8]])
    return global_predictions, reranked_predictions, positives


def test_reranking_changes_counts_fixed_broken_and_unchanged_queries_and_the_rank_change():
    global_predictions, reranked_predictions, positives = hand_made_case()
    changes = reranking_changes(global_predictions, reranked_predictions, positives, rerank_top=3)
    histogram = {label: 0 for label in changes["rank_change"]["histogram"]}
    histogram.update({"-4 to -2": 1, "0": 1, "+1": 1})
    assert changes == {
        "fixed": 1,
        "broken": 1,
        "unchanged": 3,
        "unchanged_right": 1,
        "unchanged_wrong": 2,
        "queries_num": 5,
        "within_reach": 3,
        "rank_change": {"improved": 1, "same": 1, "worsened": 1, "mean": -0.3333, "histogram": histogram},
    }
    assert list(histogram) == [
        "-10 or less",
        "-9 to -5",
        "-4 to -2",
        "-1",
        "0",
        "+1",
        "+2 to +4",
        "+5 to +9",
        "+10 or more",
    ]
    assert changes_summary(changes) == "reranking fixed 1 query and broke 1 (3 unchanged: 1 right, 2 wrong, at top-1)"


def test_reranking_changes_without_ground_truth_is_none_and_says_so():
    global_predictions, reranked_predictions, _ = hand_made_case()
    assert reranking_changes(global_predictions, reranked_predictions, None, rerank_top=3) is None
    assert changes_summary(None).startswith("no ground truth")


def test_reranking_changes_refuses_predictions_that_do_not_fit():
    global_predictions, reranked_predictions, positives = hand_made_case()
    with pytest.raises(ValueError, match="must both be"):
        reranking_changes(global_predictions, reranked_predictions[:, :3], positives, rerank_top=3)
    with pytest.raises(ValueError, match="rerank_top"):
        reranking_changes(global_predictions, reranked_predictions, positives, rerank_top=5)
    with pytest.raises(ValueError, match="positives has 4 rows"):
        reranking_changes(global_predictions, reranked_predictions, positives[:4], rerank_top=3)


def test_shown_queries_caps_each_class_and_prefers_queries_with_a_picture_up_to_their_own_cap():
    groups = {"fixed": np.arange(0, 40), "broken": np.arange(40, 43)}
    pictured = {1, 2, 3, 4, 41}
    shown, with_picture = shown_queries(groups, pictured, cap=10, pictures_cap=2)
    assert len(shown["fixed"]) == 10 and list(shown["broken"]) == [40, 41, 42]
    assert with_picture == {1, 4, 41}  # the first and last of fixed's pictured queries, spread evenly
    assert shown["fixed"][0] == 0 and shown["fixed"][-1] == 39 and list(shown["fixed"]) == sorted(shown["fixed"])
    assert set(shown["fixed"]) >= {1, 4}


# ----------------------------------------------------------------------------------------------------------------
# A synthetic evaluation: images drawn with PIL, predictions with every class


def draw_image(path: Path, seed: int, label: str, size=(192, 144)) -> Path:
    """A street-like picture: a sky gradient, coloured blocks with windows, the label, some sensor noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    sky = np.linspace(200, 120, height)[:, None, None] * np.array([0.8, 0.9, 1.0])  # (H, 1, 3)
    pixels = np.broadcast_to(sky, (height, width, 3)).copy()
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    x = 0
    while x < width:
        block = int(rng.integers(25, 70))
        top = int(rng.integers(20, 80))
        draw.rectangle([x, top, x + block, height], fill=tuple(int(c) for c in rng.integers(60, 230, 3)))
        for wx in range(x + 5, x + block - 10, 14):
            for wy in range(top + 8, height - 20, 20):
                draw.rectangle([wx, wy, wx + 7, wy + 10], fill=(40, 50, 70))
        x += block + 4
    draw.text((8, 8), label, fill=(0, 0, 0))
    noise = rng.normal(0, 6, (height, width, 3))
    noisy = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(path, quality=90)
    return path


def synthetic_data(folder: Path, queries_num: int, database_num: int, k: int = 10, rerank_top: int = 8, seed: int = 0):
    """ReportData of a made-up evaluation: query q's one positive is database image q % database_num, placed at a
    random global rank (sometimes beyond rerank_top or K); reranking shuffles the first rerank_top candidates and
    brings the positive to the front for a third of the queries."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    queries = [draw_image(folder / f"query_{q:04d}.jpg", 10_000 + q, f"query {q}") for q in range(queries_num)]
    database = [draw_image(folder / f"db_{d:04d}.jpg", d, f"database {d}") for d in range(database_num)]
    positives = [np.array([q % database_num]) for q in range(queries_num)]
    global_predictions = np.empty((queries_num, k), dtype=np.int64)
    reranked_predictions = np.empty_like(global_predictions)
    for q in range(queries_num):
        row = rng.permutation(np.setdiff1d(np.arange(database_num), positives[q]))[:k]
        rank = int(rng.integers(0, rerank_top + 2))
        if rank < k:
            row[rank] = positives[q][0]
        global_predictions[q] = row
        head = rng.permutation(row[:rerank_top])
        if rank < rerank_top and rng.random() < 1 / 3:
            head = np.concatenate([[row[rank]], head[head != row[rank]]])
        reranked_predictions[q] = np.concatenate([head, row[rerank_top:]])
    values = [1, 5, 10]
    return ReportData(
        split_name="synthetic test",
        query_paths=queries,
        database_paths=database,
        global_predictions=global_predictions,
        reranked_predictions=reranked_predictions,
        positives=positives,
        global_recalls=recall_at_n(global_predictions, positives, values),
        reranked_recalls=recall_at_n(reranked_predictions, positives, values),
        rerank_top=rerank_top,
    )


def correspondence_picture(path: Path) -> Path:
    """A stand-in for reranking/<query>.png: two panels joined by lines."""
    image = Image.new("RGB", (900, 520), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([10, 10, 430, 250], fill=(120, 140, 170))
    draw.rectangle([470, 10, 890, 250], fill=(130, 150, 160), outline=(40, 170, 60), width=5)
    for i in range(8):
        draw.line([(40 + 45 * i, 40 + 20 * i), (500 + 40 * i, 60 + 15 * i)], fill=(200, 60 * (i % 4), 40), width=2)
    image.save(path)
    return path


@pytest.mark.slow
def test_the_report_stays_under_2_mb_for_300_queries_at_the_cap(tmp_path):
    data = synthetic_data(tmp_path / "images", queries_num=300, database_num=150, k=10, rerank_top=8, seed=1)
    changes = reranking_changes(data.global_predictions, data.reranked_predictions, data.positives, data.rerank_top)
    settings = ReportSettings()
    # the case fills the cap of at least two classes
    assert (
        sum(changes[key] > settings.queries_per_class for key in ("fixed", "unchanged_right", "unchanged_wrong")) >= 2
    )
    write_report(tmp_path / "report.html", data, settings)
    size = (tmp_path / "report.html").stat().st_size
    assert size < 2 * 1024 * 1024, size
    page = (tmp_path / "report.html").read_text()
    assert f"At most {settings.queries_per_class} queries per class" in page
    assert "predictions.csv" in page
    assert page.count("class='card'") <= settings.queries_per_class * len(CLASSES)


def test_the_report_refuses_data_that_does_not_fit(tmp_path):
    data = synthetic_data(tmp_path / "images", queries_num=4, database_num=6, k=3, rerank_top=3)
    data.global_predictions[0, 0] = 6
    with pytest.raises(ValueError, match=r"global_predictions holds indices outside \[0, 6\)"):
        check_report_data(data)
    data.global_predictions[0, 0] = 0
    data.correspondence_pictures = {2: tmp_path / "missing.png"}
    with pytest.raises(ValueError, match="missing.png"):
        check_report_data(data)
    data.correspondence_pictures = {}
    data.reranked_recalls = None
    with pytest.raises(ValueError, match="both"):
        check_report_data(data)


def test_the_page_names_no_outside_resource(tmp_path):
    data = synthetic_data(tmp_path / "images", queries_num=12, database_num=20)
    page = render_page(data, ReportSettings(queries_per_class=3))
    assert "http:" not in page and "https:" not in page  # base64 has no ":", so this holds for the pictures too
    markup, rest = page.split("<script>const IMAGES")
    script = rest.split("</script>", 1)[1]
    for text in (markup, script):
        assert "//" not in text and "url(" not in text and "@import" not in text
    assert "src=" not in markup  # pictures come from the inlined IMAGES table only


# ----------------------------------------------------------------------------------------------------------------
# In a real browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium from the system's packages (apt-get install chromium chromium-driver); skipped when absent,
    except in CI (CI=true), where the page must be tested."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if webdriver is None:
        missing.append("the selenium package")
    if missing:
        why = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver; pip install selenium)"
        if IN_CI:
            pytest.fail(f"{why}: CI must test report.html in a browser")
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1600",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingOptions", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


def open_page(browser, path: Path) -> None:
    """Load the page from disk and wait until every picture is decoded."""
    browser.get(path.resolve().as_uri())
    WebDriverWait(browser, 30).until(
        lambda driver: driver.execute_script(
            "return document.readyState === 'complete' && "
            "Array.prototype.every.call(document.images, function (img) { return img.complete; });"
        )
    )


def visible_cards(browser) -> list[dict]:
    return browser.execute_script(
        "return Array.prototype.filter.call(document.querySelectorAll('.card'), function (c) { return !c.hidden; })"
        ".map(function (c) { return {query: Number(c.dataset.query), cls: c.dataset.class,"
        " change: Number(c.dataset.change)}; });"
    )


def choose(browser, select_id: str, value: str) -> None:
    Select(browser.find_element(By.ID, select_id)).select_by_value(value)


def assert_everything_loaded(browser) -> None:
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
    widths = browser.execute_script("return Array.prototype.map.call(document.images, i => i.naturalWidth);")
    assert widths and all(width > 0 for width in widths), widths


@pytest.mark.slow
def test_the_report_filters_sorts_and_loads_every_picture_in_a_browser(browser, tmp_path):
    data = synthetic_data(tmp_path / "images", queries_num=40, database_num=30, k=10, rerank_top=8, seed=2)
    data.correspondence_pictures = {3: correspondence_picture(tmp_path / "00003_query.png")}
    settings = ReportSettings(top_k=4, queries_per_class=6)
    write_report(tmp_path / "report.html", data, settings)
    open_page(browser, tmp_path / "report.html")
    assert_everything_loaded(browser)
    changes = reranking_changes(data.global_predictions, data.reranked_predictions, data.positives, data.rerank_top)
    expected = {"fixed": "fixed", "broken": "broken", "unchanged-right": "unchanged_right"}
    expected["unchanged-wrong"] = "unchanged_wrong"

    everything = visible_cards(browser)
    assert [card["query"] for card in everything] == sorted(card["query"] for card in everything)
    for name in CLASSES:
        choose(browser, "filter", name)
        shown = visible_cards(browser)
        assert {card["cls"] for card in shown} <= {name}
        assert len(shown) == min(changes[expected[name]], settings.queries_per_class), name
    choose(browser, "filter", "all")
    assert len(visible_cards(browser)) == len(everything)

    choose(browser, "sort", "improved")
    changes_shown = [card["change"] for card in visible_cards(browser)]
    assert changes_shown == sorted(changes_shown, reverse=True) and changes_shown[0] > changes_shown[-1]
    choose(browser, "sort", "worsened")
    changes_shown = [card["change"] for card in visible_cards(browser)]
    assert changes_shown == sorted(changes_shown)
    choose(browser, "sort", "query")
    assert visible_cards(browser) == everything
    assert browser.execute_script("return document.querySelectorAll('details img.picture').length;") == 1

    screenshot = tmp_path / "report.png"
    browser.save_screenshot(str(screenshot))
    with Image.open(screenshot) as image:
        assert image.width > 0 and image.height > 0


@pytest.mark.slow
def test_without_ground_truth_the_page_is_the_gallery_only(browser, tmp_path):
    data = synthetic_data(tmp_path / "images", queries_num=10, database_num=12, k=5, rerank_top=5)
    data.positives = data.global_recalls = data.reranked_recalls = None
    write_report(tmp_path / "report.html", data, ReportSettings(top_k=3, queries_per_class=6))
    open_page(browser, tmp_path / "report.html")
    assert_everything_loaded(browser)
    page = browser.page_source
    assert "No ground truth" in page and 'id="filter"' not in page and "fixed (" not in page
    assert len(visible_cards(browser)) == 6
    assert {card["cls"] for card in visible_cards(browser)} == {"all"}
    assert browser.execute_script("return document.querySelectorAll('img.thumb.correct, img.thumb.wrong').length;") == 0
