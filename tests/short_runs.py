"""Settings and helpers shared by the tests that run the entry points for a few steps on the small toy world (not a
test module)."""

import shutil
from pathlib import Path

import pytest

import runs

# A few short mining rounds: 16 queries per epoch in rounds of 8, 4 tuples per step with 3 negatives each drawn from
# 20 sampled database images, seed 3, lr 1e-3 (large enough that a step visibly moves the weights).
SHORT_TRAINING = [
    "--seed",
    "3",
    "--queries_per_epoch",
    "16",
    "--cache_refresh_rate",
    "8",
    "--train_batch_size",
    "4",
    "--negs_num_per_query",
    "3",
    "--neg_samples_num",
    "20",
    "--lr",
    "1e-3",
]


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
