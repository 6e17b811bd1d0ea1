"""Run folders: a run deletes only what a run of this project made (the folder's manifest names it), never a file
someone else put there, and never a file it is about to read."""

import argparse
import contextlib
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_faults import FAST, MINING_FAST, run_script, snapshot

import pre_compute_mining
import run_folder
import runs
import test as test_script
import train_reranking
from model.checkpoint import save_model
from model.network import ModelConfig, PRGSNetwork


def fake_args(folder: Path, overwrite: bool = False, **flags) -> argparse.Namespace:
    """The flags runs.start_run reads, for a run whose body the test writes."""
    base = dict(device="cpu", dist_timeout=1.0, output_folder=str(folder), save_dir="fake", overwrite=overwrite, seed=0)
    return argparse.Namespace(**base, resume=None, **flags)


def fake_run(folder: Path, outputs: dict[str, bytes], overwrite: bool = False, fail: bool = False) -> None:
    """A run that uses its scratch space and writes ``outputs`` (relative path -> bytes) into its folder, then fails
    with RuntimeError when ``fail``."""
    with runs.start_run(fake_args(folder, overwrite)) as run:
        store = run.scratch_folder() / "local_features"
        store.mkdir()
        (store / "rows.f16").write_bytes(b"scratch")
        for path, content in outputs.items():
            (run.folder / path).parent.mkdir(parents=True, exist_ok=True)
            (run.folder / path).write_bytes(content)
        if fail:
            raise RuntimeError("the run body failed")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A toy-preset model checkpoint (untrained) that every script can --resume."""
    path = tmp_path_factory.mktemp("checkpoint") / "model.pth"
    save_model(PRGSNetwork(ModelConfig(backbone="deit_micro", image_size=(144, 192), local_dim=32)), path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The manifest and the scratch space


def test_a_run_records_what_it_makes_and_its_scratch_space_is_its_own(tmp_path):
    folder = tmp_path / "run"
    with runs.start_run(fake_args(folder)) as run:
        scratch = run.scratch_folder()
        assert scratch.parent == folder and scratch.name.startswith(run_folder.SCRATCH_PREFIX)
        assert scratch.name in run_folder.Manifest.read(folder).folders  # recorded before use
        (folder / "best.pth").write_bytes(b"weights")
        run.note("best.pth", "epoch 0")
        assert "best.pth" in run_folder.Manifest.read(folder).files  # recorded as it is made
        (folder / "test").mkdir()
        (folder / "test" / "results.json").write_text("{}")
    manifest = run_folder.Manifest.read(folder)
    assert manifest.files == {"best.pth", "debug.log", "info.log", "test/results.json"}
    assert manifest.folders == {"test"} and not scratch.exists()
    assert sorted(p.name for p in folder.glob(".*")) == [run_folder.MANIFEST_FILE_NAME]


def test_a_failed_run_records_its_failure_and_the_next_run_replaces_it(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(RuntimeError) as stopped:
        fake_run(folder, {"last.pth": b"epoch 1"}, fail=True)
    assert stopped.value.__notes__ == [f"kept in {folder}: last.pth"]
    assert "failed.json" in run_folder.Manifest.read(folder).files
    assert not list(folder.glob(f"{run_folder.SCRATCH_PREFIX}*"))
    fake_run(folder, {"last.pth": b"epoch 2"}, overwrite=True)
    assert not (folder / "failed.json").exists() and (folder / "last.pth").read_bytes() == b"epoch 2"


def test_an_unreadable_manifest_is_refused_and_nothing_is_removed(tmp_path):
    folder = tmp_path / "run"
    fake_run(folder, {"results.json": b"{}"})
    (folder / run_folder.MANIFEST_FILE_NAME).write_text("not json")
    before = snapshot(folder)
    with pytest.raises(run_folder.RunFolderError, match="cannot read .*choose another --output_folder"):
        fake_run(folder, {}, overwrite=True)
    assert snapshot(folder) == before


def test_a_manifest_naming_paths_outside_its_folder_removes_nothing_there(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "results.json").write_text("keep too")
    folder = tmp_path / "run"
    fake_run(folder, {"results.json": b"{}"})
    (folder / "link").symlink_to(tmp_path / "linked")
    manifest = run_folder.Manifest.read(folder)
    manifest.files |= {"../precious.txt", str(outside), "link/results.json"}
    manifest.write()
    fake_run(folder, {}, overwrite=True)
    assert outside.read_text() == "keep" and (tmp_path / "linked" / "results.json").read_text() == "keep too"


# ----------------------------------------------------------------------------------------------------------------
# What users found: --overwrite removed a file the run was about to read, and folders the user made


@pytest.mark.parametrize("script", [test_script, pre_compute_mining, train_reranking])
def test_overwrite_never_removes_the_checkpoint_the_run_resumes(script, checkpoint, tmp_path, capsys):
    folder = tmp_path / "run"
    name = "last.pth" if script is train_reranking else "best.pth"  # train_reranking: resumed into another stage
    fake_run(folder, {name: checkpoint.read_bytes(), "results.json": b"{}"})
    before = snapshot(folder)
    fast = [*MINING_FAST, "--output", str(tmp_path / "hn.npz")] if script is pre_compute_mining else FAST
    argv = ["--resume", str(folder / name), "--output_folder", str(folder), *fast]
    for overwrite in ([], ["--overwrite"]):
        status, line = run_script(script.main, [*argv, *overwrite], capsys)
        assert status == 2 and f"--resume {folder / name}, which this run reads" in line, line
        assert "choose another --output_folder" in line and "pass --overwrite" not in line
        assert snapshot(folder) == before


def test_folders_the_user_made_are_never_removed(small_toy_world, tmp_path, capsys):
    folder = tmp_path / "run"
    for name in ("work", "local_features"):
        (folder / name).mkdir(parents=True)
        (folder / name / "mine.txt").write_text(f"the user's own {name}")
    before = snapshot(folder)
    argv = ["--datasets_folder", str(small_toy_world), "--output_folder", str(folder), *FAST]
    for overwrite in ([], ["--overwrite"]):
        status, line = run_script(test_script.main, [*argv, *overwrite], capsys)
        assert status == 2 and "local_features, work" in line and "not made by this project" in line, line
        assert snapshot(folder) == before
    folder = tmp_path / "earlier_run"
    argv = with_output_folder(argv, folder)
    test_script.main(argv)  # an earlier run; then the user adds their own files and folders
    made = snapshot(folder)
    mine = {"work/mine.txt": b"1", "local_features/mine.txt": b"2", "notes.txt": b"3", "mine.pth": b"4"}
    for path, content in mine.items():
        (folder / path).parent.mkdir(exist_ok=True)
        (folder / path).write_bytes(content)
    status, line = run_script(test_script.main, argv, capsys)
    earlier = ", ".join(sorted({path.split("/")[0] for path in made if not path.startswith(".")}))
    assert status == 2 and f"outputs of an earlier run ({earlier}); pass --overwrite" in line, line
    test_script.main([*argv, "--overwrite"])
    assert {path: snapshot(folder)[path] for path in mine} == mine  # removed: what the refusal listed, only


def test_user_files_named_like_outputs_are_refused_not_removed(small_toy_world, tmp_path, capsys):
    folder = tmp_path / "run"
    argv = ["--datasets_folder", str(small_toy_world), "--output_folder", str(folder), *FAST]
    test_script.main(argv)
    for path in ("test/results.json", "predictions/mine.png", "best.pth"):
        (folder / path).parent.mkdir(exist_ok=True)
        (folder / path).write_text("the user's")
    before = snapshot(folder)
    status, line = run_script(test_script.main, [*argv, "--overwrite"], capsys)
    assert status == 2 and "holds best.pth, predictions, test, which no run of this project made" in line, line
    assert snapshot(folder) == before


def with_output_folder(argv: list[str], folder: Path) -> list[str]:
    return [str(folder) if number and argv[number - 1] == "--output_folder" else a for number, a in enumerate(argv)]


# ----------------------------------------------------------------------------------------------------------------
# The property: whatever a folder holds, a run removes only what runs made, and only on a later --overwrite

NAMES = ["test", "predictions", "work", "local_features", "results.json", "info.log", "notes.txt", "best.pth"]
NAMES += ["mine.pth", "failed.json", "predictions.csv"]
LAYOUTS = [  # what a test.py-like and a train_reranking.py-like run write
    {"results.json": b"test", "predictions.csv": b"q,d", "predictions/0.png": b"png"},
    {"last.pth": b"last", "best.pth": b"best", "results.json": b"train", "test/results.json": b"t"},
]
user_trees = st.dictionaries(
    st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join), st.binary(), max_size=5
)
runs_ = st.tuples(st.just("run"), st.booleans(), st.sampled_from(range(len(LAYOUTS))), st.booleans())
steps = st.lists(st.one_of(st.tuples(st.just("user"), user_trees), runs_), min_size=1, max_size=5)


def add_user_files(folder: Path, tree: dict[str, bytes], users: dict[str, bytes]) -> None:
    """Write each file of tree where nothing is (no file on its way, no folder in its place), as a user would."""
    for path, content in tree.items():
        target = folder / path
        on_the_way = [folder / "/".join(path.split("/")[:depth]) for depth in range(1, path.count("/") + 1)]
        if target.exists() or any(p.is_file() for p in on_the_way):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        users[path] = content


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps)
def test_a_run_removes_only_what_runs_made_and_only_with_overwrite(steps):
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) / "run"
        users: dict[str, bytes] = {}  # what users wrote: must stay, byte for byte
        made: set[str] = set()  # what runs made and is still there
        for step in steps:
            if step[0] == "user":
                add_user_files(folder, step[1], users)
                continue
            _, overwrite, layout, fail = step
            before = snapshot(folder) if folder.exists() else {}
            with contextlib.suppress(RuntimeError):
                try:
                    fake_run(folder, LAYOUTS[layout], overwrite, fail)
                except run_folder.RunFolderError:
                    assert (snapshot(folder) if folder.exists() else {}) == before  # refused: nothing touched
                    continue
            after = snapshot(folder)
            assert {path: after.get(path) for path in users} == users
            rewritten = set(LAYOUTS[layout]) | set(run_folder.LOG_FILE_NAMES)
            if overwrite and before:
                assert not (made - rewritten) & set(after)  # the earlier run's outputs went
            else:
                assert made <= set(after)
            made = (made & set(after)) | rewritten
            assert not list(folder.glob(f"{run_folder.SCRATCH_PREFIX}*"))
            assert made <= run_folder.Manifest.read(folder).files  # a later --overwrite will remove them
