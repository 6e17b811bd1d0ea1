"""Fault injection: every failure reported in issue 8, and its neighbours. Each test checks the message (one line,
no traceback, naming the problem) AND that nothing was lost or silently changed: earlier outputs byte-identical, no
scratch store or empty run folder left behind, no numbers that are not the run's own."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from short_runs import SHORT_TRAINING

import evaluation
import feature_store
import pre_compute_mining
import run_folder
import runs
import test as test_script
import train_reranking
import training
import util
from config import EvalSettings
from datasets_ws import SplitRequest, load_split
from mining import MiningFileError, dataset_fingerprints, image_file_stats, load_hard_negatives, save_hard_negatives
from places.images import BadImageError, open_rgb_image, rgb_image
from places.walk import find_images

REPO_ROOT = Path(__file__).resolve().parents[1]
MINING_FAST = ["--num_workers", "0", "--infer_batch_size", "32"]
FAST = [*MINING_FAST, "--recall_values", "1", "5"]
TRAIN = [
    *SHORT_TRAINING,
    "--train_stage",
    "reranker",
    "--cache_frozen_backbone",
    "--backbone_weights",
    "none",
    "--patience",
    "5",
]


def run_script(main, argv: list[str], capsys) -> tuple[int, str]:
    """Run a script's main() as its __main__ does; (exit status, the one line it ended with: 'error: ...',
    'interrupted: ...', or argparse's '<script>: error: ...')."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        runs.run_entry_point(lambda: main(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err, err
    final = [line for line in err.splitlines() if line.startswith(("error:", "interrupted:")) or ": error: " in line]
    assert len(final) == 1, err
    return stopped.value.code, final[0]


def with_flag(flags: list[str], name: str, value: str) -> list[str]:
    """flags with the value of --name replaced."""
    return [value if number and flags[number - 1] == name else flag for number, flag in enumerate(flags)]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_world(small_toy_world: Path, tmp_path: Path) -> Path:
    datasets = tmp_path / "datasets"
    shutil.copytree(small_toy_world, datasets, symlinks=True)
    return datasets


@pytest.fixture(scope="module")
def interrupted_run(small_toy_world, tmp_path_factory) -> Path:
    """A training run stopped by --max_steps 5 in its second epoch (4 steps of 4 tuples each): epoch 0 validated
    (best.pth), last.pth after the first step of a mining round of 8 tuples."""
    folder = tmp_path_factory.mktemp("interrupted") / "run"
    train_reranking.main(
        ["--datasets_folder", str(small_toy_world), "--output_folder", str(folder), "--epochs_num", "2"]
        + ["--max_steps", "5", *TRAIN, *FAST]
    )
    return folder


def resume_argv(datasets: Path, run: Path, output_folder: Path, flags: list[str] = TRAIN) -> list[str]:
    """train_reranking.py flags resuming the last.pth of run (made by interrupted_run) into output_folder."""
    return ["--datasets_folder", str(datasets), "--resume", str(run / "last.pth"), "--output_folder"] + [
        str(output_folder),
        "--epochs_num",
        "2",
        *flags,
        *FAST,
    ]


def copy_run(run: Path, tmp_path: Path) -> Path:
    copied = tmp_path / "run"
    shutil.copytree(run, copied)
    return copied


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


# ----------------------------------------------------------------------------------------------------------------
# Datasets


def test_a_symlink_loop_does_not_make_the_database_swallow_the_queries(small_toy_world, tmp_path, caplog):
    datasets = copy_world(small_toy_world, tmp_path)
    split = datasets / "toy_world" / "images" / "test"
    expected = load_split(SplitRequest(datasets, "toy_world", "test"))
    os.symlink("..", split / "database" / "loop")  # database/loop/queries/... would be listed as database
    os.symlink(split / "queries", split / "database" / "queries_link")
    index = load_split(SplitRequest(datasets, "toy_world", "test"))
    assert index.database_paths == expected.database_paths and index.queries_paths == expected.queries_paths
    assert "left out 2 symlinked folders, not followed" in caplog.text
    assert "loop" in caplog.text and "queries_link" in caplog.text


def test_every_image_once_and_what_was_skipped_is_named(tmp_path, caplog):
    folder = tmp_path / "database"
    folder.mkdir()
    for name in ("a.jpg", "b.JPG", "c.jpeg", "d.png"):
        Image.new("RGB", (4, 4)).save(folder / name, format="PNG" if name.endswith("png") else "JPEG")
    (folder / "notes.txt").write_text("not an image")
    (folder / "._a.jpg").write_bytes(b"AppleDouble")
    os.symlink("a.jpg", folder / "e.jpg")  # the same image under a second name
    os.symlink("missing.jpg", folder / "f.jpg")
    listing = find_images(folder)
    assert listing.images == ["a.jpg", "b.JPG", "c.jpeg", "d.png"]
    listing.warn_about_skipped(folder)
    for name in ("notes.txt", "._a.jpg", "e.jpg (= a.jpg)", "f.jpg"):
        assert name in caplog.text
    assert "extension is not one of .jpg, .jpeg, .png" in caplog.text


GRADIENT = np.arange(256).reshape(16, 16)


def _image_of_mode(mode: str) -> Image.Image:
    """A 16x16 grey gradient (0..255) in the given mode; 16-bit modes hold it in their high byte."""
    if mode.startswith("I;16"):  # Pillow's convert() between 16-bit modes clips: build the bytes
        byte_order = ">" if mode == "I;16B" else "<"
        return Image.frombytes(mode, (16, 16), (GRADIENT * 256).astype(f"{byte_order}u2").tobytes())
    if mode == "I":
        return Image.fromarray((GRADIENT * 256).astype(np.int32))
    if mode == "F":
        return Image.fromarray((GRADIENT / 255).astype(np.float32))
    return Image.fromarray(GRADIENT.astype(np.uint8)).convert("RGB").convert(mode)


@pytest.mark.parametrize(
    "mode", ["1", "L", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "LA", "I;16", "I;16B", "I"]
)
def test_every_image_mode_decodes_to_rgb(mode):
    rgb = np.asarray(rgb_image(_image_of_mode(mode), f"image_{mode}"))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    if mode in ("L", "RGB", "RGBA", "RGBX", "LA", "I;16", "I;16B", "I"):  # grey stays grey; 16-bit is not clipped
        np.testing.assert_array_equal(rgb[..., 1], GRADIENT)


def test_a_16_bit_png_file_keeps_its_grey_levels(tmp_path):
    path = tmp_path / "depth.png"
    _image_of_mode("I;16").save(path)
    np.testing.assert_array_equal(np.asarray(open_rgb_image(path))[..., 0], GRADIENT)  # Pillow < 10: mode I


def test_image_modes_without_an_8_bit_meaning_are_refused_by_name(tmp_path):
    path = tmp_path / "float.tiff"
    _image_of_mode("F").save(path)
    with pytest.raises(BadImageError, match=rf"image {path} has mode F \(32-bit float pixels\).*--skip_bad_images"):
        open_rgb_image(path)
    with pytest.raises(BadImageError, match="has mode La, which cannot be converted to RGB"):
        rgb_image(Image.new("La", (4, 4)), "premultiplied")


def test_an_image_replaced_in_place_makes_the_hard_negative_file_stale(small_toy_world, tmp_path, caplog):
    datasets = copy_world(small_toy_world, tmp_path)
    index = load_split(SplitRequest(datasets, "toy_world", "train"))
    path = tmp_path / "hn.npz"
    negatives = np.tile(np.arange(10), (index.queries_num, 1))

    save_hard_negatives(
        path, negatives, {"dataset": index.name, **dataset_fingerprints(index)}, image_file_stats(index)
    )
    load_hard_negatives(path, index, 5, "hint")  # unchanged: accepted
    touched = index.absolute_path(3)
    os.utime(touched, ns=(0, 0))  # same content, another time: a warning naming it
    load_hard_negatives(path, index, 5, "hint")
    assert "1 images have another modification time" in caplog.text and index.database_paths[3] in caplog.text
    Image.new("RGB", (192, 144), (1, 2, 3)).save(touched, quality=50)  # replaced in place
    with pytest.raises(Exception, match=rf"1 images changed since .*hn.npz was mined.*{index.database_paths[3]}"):
        load_hard_negatives(path, index, 5, "hint")


# ----------------------------------------------------------------------------------------------------------------
# Training


def test_resuming_into_a_new_folder_takes_its_best_along_and_tests_it(
    small_toy_world, interrupted_run, tmp_path, caplog
):
    before = snapshot(interrupted_run)
    folder = tmp_path / "resumed"
    results = train_reranking.main(resume_argv(small_toy_world, interrupted_run, folder))
    assert "exactly: epoch 1, round 0, step 1" in caplog.text and "NOT exactly" not in caplog.text
    assert "copied best.pth (epoch 0)" in caplog.text
    assert (folder / "best.pth").is_file() and results["test"]["reranked"]["R@1"] >= 0
    assert json.loads((folder / "results.json").read_text())["stopped"] == "epochs_num"
    assert snapshot(interrupted_run) == before  # the interrupted run is untouched


def test_resuming_with_another_batch_size_says_what_differs(small_toy_world, interrupted_run, tmp_path, caplog):
    flags = [*with_flag(TRAIN, "--train_batch_size", "2"), "--max_steps", "7"]
    train_reranking.main(resume_argv(small_toy_world, interrupted_run, tmp_path / "resumed", flags))
    expected = "NOT exactly as the interrupted run would have continued: --train_batch_size 2 (the checkpoint's: 4)"
    assert expected in caplog.text
    state = torch.load(tmp_path / "resumed" / "last.pth", weights_only=True)["training_state"]["state"]
    # 1 step of 4 tuples before, 2 steps of 2 after: the round's 8 tuples, none skipped or repeated
    assert state["global_step"] == 7 and state["tuples_done"] == 8


def test_a_diverged_run_stops_and_keeps_the_last_good_checkpoints(small_toy_world, interrupted_run, tmp_path, capsys):
    run = copy_run(interrupted_run, tmp_path)
    before = snapshot(run)
    argv = resume_argv(small_toy_world, run, run, with_flag(TRAIN, "--lr", "1e30"))
    status, line = run_script(train_reranking.main, argv, capsys)
    assert status == 2 and line.startswith("error: training diverged at epoch 1, step")
    assert "lower --lr or set --grad_clip" in line and f"kept in {run}: best.pth (epoch 0), last.pth (epoch 1" in line
    for name in ("last.pth", "best.pth"):
        assert snapshot(run)[name] == before[name]
        weights = torch.load(run / name, weights_only=True)["model_state_dict"]
        assert all(torch.isfinite(value).all() for value in weights.values())
    assert snapshot(run)["results.json"] == before["results.json"] and not (run / "work").exists()
    status, line = run_script(train_reranking.main, ["--lr", "inf", *FAST], capsys)
    assert status == 2 and "expected a finite positive number, got inf" in line


def test_more_negatives_than_the_database_has_is_one_line(small_toy_world, tmp_path, capsys):
    folder = tmp_path / "run"
    argv = ["--datasets_folder", str(small_toy_world), "--output_folder", str(folder), *TRAIN, *FAST]
    status, line = run_script(train_reranking.main, [*argv, "--negs_num_per_query", "500"], capsys)
    assert status == 2 and "--negs_num_per_query 500 is more than the training split" in line
    assert "Use --negs_num_per_query" in line and not folder.exists()
    status, line = run_script(train_reranking.main, [*argv, "--train_batch_size", "9"], capsys)
    assert status == 2 and "--train_batch_size 9 is larger than a mining round of 8 queries" in line


def _write_vg_image(folder: Path, east: float, north: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (90, 90, 90)).save(folder / f"@{east}@{north}@17@T@0@0@x@0@0@0@0@0@2020@x@.jpg")


def test_a_training_split_without_any_positive_is_one_line(tmp_path, capsys):
    for split in ("train", "val", "test"):
        for i in range(4):
            _write_vg_image(tmp_path / "far" / "images" / split / "database", 10.0 * i, 0.0)
            _write_vg_image(tmp_path / "far" / "images" / split / "queries", 5000.0 + i, 0.0)
    argv = ["--datasets_folder", str(tmp_path), "--dataset_name", "far", "--output_folder", str(tmp_path / "run")]
    argv += ["--backbone", "deit_micro", "--resize", "144", "192", "--local_dim", "32", *TRAIN, *FAST]
    status, line = run_script(train_reranking.main, argv, capsys)
    assert (
        status == 2 and "the training split < far/train: 4 database, 0 queries > has no query with a positive" in line
    )
    assert not (tmp_path / "run").exists()


def test_the_demo_reuses_the_global_model_only_when_that_stage_finished(tmp_path):
    shutil.copy(REPO_ROOT / "train_reranking.sh", tmp_path)
    calls = tmp_path / "calls.txt"
    stub = tmp_path / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    stub.chmod(0o755)
    global_model = tmp_path / "logs" / "toy_world_demo" / "global_model"
    global_model.mkdir(parents=True)

    def demo_stage_one() -> str:
        """The first command train_reranking.sh runs after making the world."""
        calls.unlink(missing_ok=True)
        subprocess.run(
            ["bash", str(tmp_path / "train_reranking.sh")], env={**os.environ, "PYTHON": str(stub)}, check=True
        )
        lines = calls.read_text().splitlines()
        assert lines[0].startswith("-m places.toy_world --datasets_folder data --seed 0")
        return lines[1]

    (global_model / "best.pth").write_bytes(b"from an interrupted first epoch")
    (global_model / "last.pth").write_bytes(b"the interrupted run's state")
    first = demo_stage_one()
    assert "--train_stage global" in first and "--resume logs/toy_world_demo/global_model/last.pth" in first
    (global_model / "results.json").write_text(json.dumps({"stopped": "max_steps"}))
    assert "--train_stage global" in demo_stage_one()
    (global_model / "results.json").write_text(json.dumps({"stopped": "early_stopping"}))
    assert "pre_compute_mining.py" in demo_stage_one()  # finished: reused
    manifest = tmp_path / "data" / "toy_world" / "toy_world.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    later = (global_model / "results.json").stat().st_mtime + 10
    os.utime(manifest, (later, later))  # a world made after the fit (e.g. by a newer generator): fit again
    stage_one = demo_stage_one()
    assert "--train_stage global" in stage_one and "--resume" not in stage_one
    assert not (global_model / "last.pth").exists()


def test_training_queries_come_in_random_order_seeded_and_resumable(interrupted_run):
    state = torch.load(interrupted_run / "last.pth", weights_only=True)["training_state"]["state"]
    queries = state["tuples"]["queries"].numpy()
    training_queries = 16  # of the small toy world; a round draws 8 of them
    expected = np.random.default_rng([3, state["epoch"], state["round"]]).choice(training_queries, 8, replace=False)
    np.testing.assert_array_equal(queries, expected)  # the seeded draw, as drawn: not sorted
    assert not np.array_equal(queries, np.sort(queries))


def test_an_empty_split_is_refused_before_evaluating(small_toy_world, tmp_path):
    index = load_split(SplitRequest(small_toy_world, "toy_world", "test"))
    from places.index import DatasetError, subset_index

    empty = subset_index(index, np.arange(index.database_num), np.empty(0, dtype=np.int64))
    with pytest.raises(DatasetError, match="has no queries or no database images"):
        evaluation.evaluate(None, empty, EvalSettings((144, 192), torch.device("cpu")), tmp_path)
