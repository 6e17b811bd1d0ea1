"""Run folders: a run deletes only what a run of this project made (the folder's manifest names it), never a file
someone else put there, and never a file it is about to read."""

import argparse
import contextlib
import errno
import json
import os
import re
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from short_runs import (
    FAST,
    MINING_FAST,
    copy_run,
    resume_argv,
    run_script,
    snapshot,
)

import feature_store
import pre_compute_mining
import run_folder
import runs
import test as test_script
import train_reranking
import training
import util
from mining import MiningFileError, load_hard_negatives
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


# ----------------------------------------------------------------------------------------------------------------
# One run, one folder


@pytest.mark.parametrize("script", [test_script, train_reranking, pre_compute_mining])
def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_process(script, tmp_path, capsys):
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / "results.json").write_text('{"theirs": 1}')
    before = snapshot(folder)
    lock = run_folder.acquire_lock(folder / run_folder.LOCK_FILE_NAME, "output folder")  # the other run
    try:
        fast = MINING_FAST if script is pre_compute_mining else FAST
        status, line = run_script(script.main, ["--output_folder", str(folder), "--overwrite", *fast], capsys)
    finally:
        run_folder.release_lock(folder / run_folder.LOCK_FILE_NAME, lock)
    assert status == 2
    assert f"output folder {folder} is in use by another run: process {os.getpid()}" in line
    assert snapshot(folder) == before  # --overwrite removed nothing of the running one


def test_earlier_results_are_not_overwritten_without_overwrite(small_toy_world, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "results.json").write_text('{"earlier": true}')
    (folder / "predictions.csv").write_text("earlier\n")
    run_folder.Manifest(folder, {"results.json", "predictions.csv"}).write()  # what the earlier run made
    (folder / "notes.txt").write_text("the user's own file")
    before = snapshot(folder)
    argv = ["--datasets_folder", str(small_toy_world), "--output_folder", str(folder), *FAST]
    status, line = run_script(test_script.main, argv, capsys)
    assert status == 2
    assert f"output folder {folder} holds the outputs of an earlier run" in line and "--overwrite" in line
    assert snapshot(folder) == before
    results = test_script.main([*argv, "--overwrite"])
    assert json.loads((folder / "results.json").read_text()) == json.loads(json.dumps(results))
    assert (folder / "notes.txt").read_text() == "the user's own file"  # --overwrite removes only run outputs
    hidden = [p.name for p in folder.glob(".*")]
    assert hidden == [run_folder.MANIFEST_FILE_NAME], hidden  # no lock, no temporary file, no scratch space left


@pytest.mark.parametrize("where", ["output_folder", "its_parent"])
def test_an_output_folder_that_is_a_file_is_one_line(where, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    folder = a_file if where == "output_folder" else a_file / "run"
    status, line = run_script(test_script.main, ["--output_folder", str(folder), *FAST], capsys)
    assert status == 2 and str(a_file) in line
    assert a_file.read_text() == "keep me"


def test_hard_negative_file_is_not_replaced_without_overwrite(tmp_path, capsys):
    output = tmp_path / "hn.npz"
    output.write_bytes(b"an earlier file")
    argv = ["--output", str(output), "--output_folder", str(tmp_path / "mining"), *MINING_FAST]
    status, line = run_script(pre_compute_mining.main, argv, capsys)
    assert status == 2 and f"{output} exists" in line and "--overwrite" in line
    assert output.read_bytes() == b"an earlier file"
    assert not (tmp_path / "mining").exists()  # no empty run folder left behind
    folder_output = tmp_path / "a_folder"
    folder_output.mkdir()
    status, line = run_script(pre_compute_mining.main, ["--output", str(folder_output), *MINING_FAST], capsys)
    assert status == 2 and f"{folder_output} is a folder" in line


def test_a_failed_run_leaves_no_empty_log_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, line = run_script(
        test_script.main, ["--dataset_name", "pitts30k", "--datasets_folder", str(tmp_path / "none")], capsys
    )
    assert status == 2 and "datasets folder" in line
    assert "nothing was kept" in line
    assert not (tmp_path / "logs").exists()  # neither logs/test/<time> nor the logs/test it created


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("script", [test_script, train_reranking, pre_compute_mining])
def test_device_cuda_without_a_gpu_is_one_line(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fast = MINING_FAST if script is pre_compute_mining else FAST
    status, line = run_script(script.main, ["--device", "cuda", *fast], capsys)
    assert status == 2 and "--device cuda was requested but torch sees no CUDA device" in line
    assert not (tmp_path / "logs").exists()


def test_a_resume_or_hard_negative_path_that_is_a_folder_is_one_line(tmp_path, capsys):
    status, line = run_script(test_script.main, ["--resume", str(tmp_path), *FAST], capsys)
    assert status == 2 and f"--resume {tmp_path} is a folder; expected a checkpoint file" in line
    with pytest.raises(MiningFileError, match=f"hard-negative file {tmp_path} is a folder"):
        load_hard_negatives(tmp_path, None, 1, "hint")


# ----------------------------------------------------------------------------------------------------------------
# Interruptions and a full disk


def test_sigterm_stops_like_ctrl_c(capsys):
    def main():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    with pytest.raises(SystemExit) as stopped:
        runs.run_entry_point(main)
    assert stopped.value.code == 130 and "interrupted: nothing was written" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_ctrl_c_during_evaluation_removes_the_store_and_says_what_was_kept(
    small_toy_world, tmp_path, monkeypatch, capsys
):
    written = []

    def write_then_interrupt(store, ids, nodes, stage0=None):
        written.append(store.folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(feature_store.LocalFeatureStore, "write", write_then_interrupt)
    folder = tmp_path / "run"
    argv = ["--datasets_folder", str(small_toy_world), "--output_folder", str(folder), "--store_tier", "disk", *FAST]
    status, line = run_script(test_script.main, argv, capsys)
    assert status == 130 and line == f"interrupted: nothing was kept: the run folder {folder} was removed"
    assert written and not written[0].exists() and not folder.exists()


def test_ctrl_c_during_training_keeps_the_last_checkpoints_and_names_them(
    small_toy_world, interrupted_run, tmp_path, monkeypatch, capsys
):
    run = copy_run(interrupted_run, tmp_path)
    before = snapshot(run)

    def interrupt(self, images, image_ids):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.Trainer, "_step", interrupt)
    status, line = run_script(train_reranking.main, resume_argv(small_toy_world, run, run), capsys)
    assert status == 130
    kept = "best.pth (epoch 0), last.pth (epoch 1, round 0, step 5, as resumed), results.json, training_curves.png"
    assert line == f"interrupted: kept in {run}: {kept}"  # results.json: of the run that stopped at --max_steps
    bookkeeping = ("failed.json", run_folder.MANIFEST_FILE_NAME)  # the manifest now names failed.json
    unchanged = {k: v for k, v in snapshot(run).items() if not k.endswith(".log") and k not in bookkeeping}
    assert unchanged == {k: v for k, v in before.items() if not k.endswith(".log") and k not in bookkeeping}
    assert json.loads((run / "failed.json").read_text())["error"].startswith("KeyboardInterrupt")
    assert not (run / "work").exists()


def test_a_full_disk_while_storing_local_features_is_one_line(small_toy_world, tmp_path, monkeypatch, capsys):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(feature_store.os, "pwrite", disk_full)
    folder = tmp_path / "run"
    argv = ["--datasets_folder", str(small_toy_world), "--output_folder", str(folder), "--store_tier", "disk", *FAST]
    status, line = run_script(test_script.main, argv, capsys)
    assert status == 2
    store = re.escape(str(folder / run_folder.SCRATCH_PREFIX)) + "[a-z0-9_]+/local_features"  # the run's scratch space
    assert re.search(f"cannot write the local-feature store {store}: ", line), line
    assert "No space left on device (errno 28)" in line and "MB free on the disk of" in line
    assert not folder.exists()


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    util.atomic_save({"epoch": torch.tensor(1)}, path)

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(util.os, "fsync", disk_full)
    with pytest.raises(util.OutputWriteError, match=rf"cannot write {path}: No space left on device \(errno 28\)"):
        util.atomic_save({"epoch": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_a_log_file_on_a_full_disk_warns_once_without_a_traceback(tmp_path, capsys):
    runs.setup_logging(tmp_path)
    log_files = [h for h in runs.logging.getLogger().handlers if isinstance(h, runs.logging.FileHandler)]

    class FullDisk:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            pass

    for handler in log_files:
        handler.stream = FullDisk()
    for number in range(3):
        runs.logger.info("line %d", number)
    runs.close_log_files()
    err = capsys.readouterr().err
    assert err.count("warning: cannot write") == 2 and "Traceback" not in err  # once per file
