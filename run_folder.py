"""A run's folder: made (logs/<save_dir>/<timestamp> or --output_folder), locked for one run, and its manifest,
the list of what runs of this project made there: the only thing --overwrite removes, and never a file the new run
reads. runs.py starts runs in it; docs/runs.md states the rules."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from util import PRGSError, atomic_write_text, describe_write_error

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

# ----------------------------------------------------------------------------------------------------------------
# The names in a run folder. A run records every file and folder it makes in the folder's manifest; --overwrite
# removes what earlier manifests name and nothing else (docs/runs.md).

LOCK_FILE_NAME = ".prgs_run.lock"
MANIFEST_FILE_NAME = ".prgs_manifest.json"
SCRATCH_PREFIX = ".prgs_scratch_"  # the scratch space of a run: a fresh folder of its own, removed when it ends
FAILED_FILE_NAME = "failed.json"
LOG_FILE_NAMES = ("info.log", "debug.log")
# The names the scripts write at the top of a run folder. They never make anything removable (only a manifest
# does); a run refuses to start where a file that no run made has one of them, so that it never writes over it.
OUTPUT_NAMES = (
    *LOG_FILE_NAMES, FAILED_FILE_NAME, "results.json", "predictions.csv", "predictions", "reranking",
    "msls_submission_*", "report.html", "last.pth", "best.pth", "training_curves.png", "test",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# A run's folder: created, locked, never shared


class RunFolderError(PRGSError):
    """An output folder or file that a run may not use: another run holds it, it holds earlier results (or files no
    run made, or a file the run reads), or it is not a folder. The message names it and says what to do."""


def make_output_folder(
    save_dir: str, logs_root: str | Path = "logs", exact_folder: str | Path | None = None
) -> tuple[Path, list[Path]]:
    """logs/<save_dir>/<YYYY-mm-dd_HH-MM-SS> (a suffix keeps two runs of the same second apart), or exact_folder.
    Returns (the folder, the folders this call created, outermost first)."""
    if exact_folder is not None:
        folder = Path(exact_folder)
        if folder.exists() and not folder.is_dir():
            raise RunFolderError(
                f"--output_folder {folder} is a file; expected a folder (or a path that does not exist yet)"
            )
        return folder, make_folders(folder, "--output_folder")
    base = Path(logs_root) / save_dir / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    created = make_folders(base.parent, "the logs folder")
    folder, suffix = base, 1
    while True:
        try:
            folder.mkdir(exist_ok=False)
            return folder, [*created, folder]
        except FileExistsError:
            folder = base.with_name(f"{base.name}_{suffix}")
            suffix += 1
        except OSError as error:
            raise RunFolderError(
                f"cannot create the output folder {folder}: {describe_write_error(error, folder)}"
            ) from None


def make_folders(folder: Path, what: str) -> list[Path]:
    """mkdir -p folder; the folders it created, outermost first; RunFolderError naming the folder on failure."""
    missing = [folder, *folder.parents]
    missing = [f for f in reversed(missing) if not f.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(
            f"cannot create {what} {folder}: {describe_write_error(error, folder)}; expected a writable folder"
        ) from None
    return missing


def acquire_lock(lock_path: Path, what: str) -> int:
    """Take the lock file lock_path (flock: released by the system if the process dies) and write who holds it.
    Returns its descriptor; RunFolderError naming the holding process when another run has it."""
    if fcntl is None:  # Windows: no advisory locks; runs are not protected from each other
        return -1
    for _ in range(5):
        descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            raise RunFolderError(
                f"{what} is in use by another run: {_lock_holder(lock_path)}. Wait for it to end, or choose "
                f"another --output_folder"
            ) from None
        try:
            same_file = os.stat(lock_path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            holder = {
                "pid": os.getpid(),
                "host": platform.node(),
                "command": " ".join(sys.argv),
                "started": datetime.now().isoformat(timespec="seconds"),
            }
            os.ftruncate(descriptor, 0)
            os.write(descriptor, json.dumps(holder).encode())
            return descriptor
        os.close(descriptor)  # the previous holder removed the file in between: lock the new one
    raise RunFolderError(f"cannot lock {what}: {lock_path} keeps changing")


def _lock_holder(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text())
        return f"process {holder['pid']} on {holder['host']} ({holder['command']}), started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"a process that holds {lock_path}"


def release_lock(lock_path: Path, descriptor: int) -> None:
    """Remove the lock file (when it is still ours) and release the lock."""
    if descriptor < 0:
        return
    try:
        if os.stat(lock_path).st_ino == os.fstat(descriptor).st_ino:
            lock_path.unlink()
    except OSError:
        pass
    os.close(descriptor)


# ----------------------------------------------------------------------------------------------------------------
# The manifest: what the runs of this project made in a folder, the only thing --overwrite removes


@dataclass
class Manifest:
    """MANIFEST_FILE_NAME in a run folder (docs/runs.md): the files and folders that runs made there, as paths
    relative to the folder ({"files": [...], "folders": [...]}), written atomically whenever it grows."""

    folder: Path
    files: set[str] = field(default_factory=set)
    folders: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, folder: Path) -> Manifest | None:
        """The folder's manifest, None when it has none; RunFolderError naming the file when it is unreadable."""
        path = folder / MANIFEST_FILE_NAME
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            files, folders = {str(f) for f in data["files"]}, {str(f) for f in data["folders"]}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RunFolderError(
                f"cannot read {path} ({type(error).__name__}: {error}); expected the list of what earlier runs made "
                f"in {folder}. Nothing there will be removed: choose another --output_folder"
            ) from None
        return cls(folder, {f for f in files if _is_entry(f)}, {f for f in folders if _is_entry(f)})

    def write(self) -> None:
        entries = {"files": sorted(self.files), "folders": sorted(self.folders)}
        atomic_write_text(self.folder / MANIFEST_FILE_NAME, json.dumps(entries, indent=1) + "\n")

    def outputs(self) -> list[str]:
        """The top-level names of what is still there of the entries (the scratch space left out): what --overwrite
        would remove (of a folder: what runs made in it)."""
        there = [f for f in self.files if _reachable(self.folder, f) and (self.folder / f).is_file()]
        there += [f for f in self.folders if _reachable(self.folder, f) and (self.folder / f).is_dir()]
        return sorted({entry.split("/")[0] for entry in there} - set(self.scratch_names()))

    def scratch_names(self) -> list[str]:
        return sorted(f for f in self.folders if f.startswith(SCRATCH_PREFIX) and "/" not in f)

    def remove(self, scratch_only: bool = False) -> None:
        """Delete the scratch space whole, and (unless ``scratch_only``) the files the entries name, then their
        folders when empty (a file someone added keeps its folder); the entries keep what is still there."""
        for name in self.scratch_names():
            shutil.rmtree(self.folder / name, ignore_errors=True)
            self.folders.discard(name)
        if scratch_only:
            return
        for entry in sorted(self.files):
            path = self.folder / entry
            if _reachable(self.folder, entry) and (path.is_symlink() or path.is_file()):
                path.unlink()
        for entry in sorted(self.folders, key=lambda f: f.count("/"), reverse=True):
            if _reachable(self.folder, entry) and (self.folder / entry).is_dir():
                with contextlib.suppress(OSError):
                    (self.folder / entry).rmdir()  # only when empty
        self.files = {f for f in self.files if os.path.lexists(self.folder / f)}
        self.folders = {f for f in self.folders if os.path.lexists(self.folder / f)}


def _is_entry(entry: str) -> bool:
    """A path a manifest may name: relative, inside the folder, not hidden (but for the scratch space)."""
    parts = entry.split("/")
    if not entry or "" in parts or ".." in parts or any(part.startswith(".") for part in parts[1:]):
        return False
    return not parts[0].startswith(".") or parts[0].startswith(SCRATCH_PREFIX)


def _reachable(folder: Path, entry: str) -> bool:
    """Whether entry lies in folder itself: no folder on its way is a symbolic link (to somewhere else)."""
    parents = entry.split("/")[:-1]
    return not any((folder / "/".join(parents[: depth + 1])).is_symlink() for depth in range(len(parents)))


def walk(folder: Path) -> dict[str, bool]:
    """Every path under folder (relative, '/'-separated) -> whether it is a folder, leaving out hidden names (the
    lock, the manifest, temporary files, the scratch space) and what lies under them; links are not followed."""
    found = {}
    for root, folders, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in folders:
            found[(base / name).as_posix()] = not os.path.islink(os.path.join(root, name))
        found.update({(base / name).as_posix(): False for name in files if not name.startswith(".")})
    return found


def _written_by_a_run(path: str, manifest: Manifest) -> bool:
    """Whether a run may write at path, where the manifest names nothing: an output name (OUTPUT_NAMES) at the top
    of the folder or in a folder a run made (training writes an evaluation's outputs into test/)."""
    parent, _, name = path.rpartition("/")
    outside = path not in manifest.files and path not in manifest.folders
    return outside and (not parent or parent in manifest.folders) and any(map(Path(name).match, OUTPUT_NAMES))


def _inputs_among(args, manifest: Manifest, output_files: Sequence[str | Path]) -> list[str]:
    """The flags whose file or folder (--resume, --hard_negatives, --backbone_weights, a cache folder, ...) is one
    the manifest names or lies in one: '--flag value' of each. A value counts as a path when it holds a separator
    or a dot (words like 'test' are the values of other flags) and names something that exists."""
    entries = {os.path.realpath(manifest.folder / f) for f in (*manifest.files, *manifest.folders)}
    written = {os.path.realpath(path) for path in output_files}
    found = []
    for flag, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if flag in ("output_folder", "save_dir") or not isinstance(item, (str, Path)):
                continue
            path = str(item)
            if not (os.sep in path or "." in path) or not os.path.lexists(path):
                continue
            real = os.path.realpath(path)
            if real not in written and any(real == entry or real.startswith(entry + os.sep) for entry in entries):
                found.append(f"--{flag} {path}")
    return found


def take_over_folder(
    folder: Path, args, resumes_in_place: bool, output_files: Sequence[str | Path]
) -> tuple[Manifest, list[str]]:
    """Decide whether a run may write into folder, and clear the way: (the folder's manifest, the names that
    --overwrite removed from it). Refused (RunFolderError, saying exactly what --overwrite would remove) when the folder
    holds files without a manifest, a file no run made where a run writes, an earlier run's outputs without
    --overwrite, or among them a file this run reads. ``resumes_in_place``: a training run continuing in its own
    folder, which keeps everything."""
    manifest = Manifest.read(folder)
    present = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if manifest is None:
        if present and not resumes_in_place:
            listed = ", ".join(present[:8]) + (f" and {len(present) - 8} more" if len(present) > 8 else "")
            raise RunFolderError(
                f"output folder {folder} holds files that were not made by this project ({listed}); they will not "
                f"be removed: choose another --output_folder"
            )
        return Manifest(folder), []
    manifest.remove(scratch_only=True)  # the scratch space of a run that was killed
    earlier = manifest.outputs()
    if resumes_in_place:
        return manifest, []
    theirs = sorted(path for path in walk(folder) if _written_by_a_run(path, manifest))
    if theirs:
        raise RunFolderError(
            f"output folder {folder} holds {', '.join(theirs)}, which no run of this project made, where a run "
            f"writes its outputs; it will be neither removed nor replaced: move it, or choose another --output_folder"
        )
    if FAILED_FILE_NAME in earlier and set(earlier) <= {FAILED_FILE_NAME, *LOG_FILE_NAMES}:
        return manifest, []  # a failed run that produced nothing but its logs
    read = _inputs_among(args, manifest, output_files)
    listed = f"output folder {folder} holds the outputs of an earlier run ({', '.join(earlier)})"
    if read:
        raise RunFolderError(
            f"{listed}, among them {', '.join(read)}, which this run reads: --overwrite would remove it; choose "
            f"another --output_folder"
        )
    if earlier and not args.overwrite:
        raise RunFolderError(
            f"{listed}; pass --overwrite to remove them (files you added stay), or choose another --output_folder"
        )
    if earlier:
        manifest.remove()
        manifest.write()
    return manifest, earlier
