"""The life cycle of a run, the same for every script: its output folder (made, locked, never shared: run_folder.py),
its scratch space, what it makes recorded in the folder's manifest, logging into it, the seeds, a failure record
saying what was kept, cleanup on every exit path (an error, Ctrl-C, SIGTERM, a full disk), and one line on stderr
instead of a traceback. Under torchrun it is rank-aware: rank 0 owns the folder, the other ranks join it.
docs/runs.md describes the rules; docs/distributed.md the launch."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

import distributed
from run_folder import (
    FAILED_FILE_NAME,
    LOCK_FILE_NAME,
    LOG_FILE_NAMES,
    MANIFEST_FILE_NAME,
    SCRATCH_PREFIX,
    Manifest,
    RunFolderError,
    acquire_lock,
    make_folders,
    make_output_folder,
    release_lock,
    take_over_folder,
    walk,
)
from util import PRGSError, atomic_write_text, describe_write_error, resolve_device, set_seed

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Logging


class _RunLogFile(logging.FileHandler):
    """info.log / debug.log: when the file cannot be written (a full disk), say so once on stderr and stop writing
    it, instead of logging's traceback on every line."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        if not getattr(self, "failed", False):
            self.failed = True
            error = sys.exc_info()[1]
            print(f"warning: cannot write {self.baseFilename} ({error}); logging to the console only", file=sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(self, "failed", False):
            super().emit(record)


def setup_logging(
    output_folder: Path | None, console_level: int = logging.INFO, rank_marker: int | None = None
) -> None:
    """info.log (INFO) and debug.log (DEBUG) in ``output_folder``, and the console at ``console_level``; with
    ``rank_marker``, every line says which rank of a torchrun launch wrote it (and the time without the date).

    Replaces the handlers an earlier call installed (other handlers, e.g. pytest's, stay)."""
    close_log_files(console_too=True)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    if rank_marker is None:
        formatter = logging.Formatter("%(asctime)s   %(message)s", "%Y-%m-%d %H:%M:%S")
    else:
        formatter = logging.Formatter(f"%(asctime)s   [rank {rank_marker}] %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    handlers[0].setLevel(console_level)
    if output_folder is not None:
        for name, level in (("info.log", logging.INFO), ("debug.log", logging.DEBUG)):
            handler = _RunLogFile(Path(output_folder) / name)
            handler.setLevel(level)
            handlers.append(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._prgs_handler = True
        root.addHandler(handler)
    for noisy in ("PIL", "matplotlib", "urllib3", "timm", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def close_log_files(console_too: bool = False) -> None:
    """Remove and close the handlers setup_logging installed: the log files (and the console handler)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_prgs_handler", False)]:
        if console_too or isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def plain_args(args) -> dict:
    """The parsed flags as JSON-ready values (tuples as lists), without the derived model configuration."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "model_config"}


# ----------------------------------------------------------------------------------------------------------------
# A run


@dataclass
class Run:
    """What every script's run starts with, used as a context manager (``with start_run(args) as run:``).

    Everything it makes in its folder goes into the folder's manifest (``record_outputs``; on the way out, at each
    ``note``). On the way out, whatever the way (success, an error, Ctrl-C, a full disk), the scratch space is
    removed and the locks are released. A run that fails leaves either nothing (its folder is removed when it holds
    only this run's logs and this run created it) or a failed.json saying what happened and what its outputs hold;
    the error gets a note with what was kept, which run_entry_point prints."""

    folder: Path  # where its outputs go
    device: torch.device
    started: float  # time.perf_counter() at the start
    created: list[Path] = field(default_factory=list)  # folders this run created, outermost first
    kept: dict[str, str] = field(default_factory=dict)  # output name -> what it holds, for the closing line
    locks: list[tuple[Path, int]] = field(default_factory=list)
    owner: bool = True  # False on the other ranks of a torchrun launch: rank 0 owns the folder and cleans it up
    scratch: Path | None = None  # the scratch space, made by the owner
    manifest: Manifest | None = None  # the owner's: what runs made in the folder
    found_at_start: set[str] = field(default_factory=set)  # what the folder held when this run began: not its own

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def lock(self, lock_path: Path, what: str) -> None:
        self.locks.append((lock_path, acquire_lock(lock_path, what)))

    def scratch_folder(self) -> Path:
        """The run's scratch space (the evaluations' local-feature stores): a folder made for this run alone,
        with a unique hidden name, recorded in the manifest before use and removed when the run ends."""
        if self.scratch is None:
            raise RunFolderError(f"the run in {self.folder} has no scratch space")
        return self.scratch

    def note(self, name: str, description: str) -> None:
        """Record what an output holds (e.g. 'last.pth': 'end of epoch 3'), for the line a failed run ends with."""
        self.kept[name] = description
        self.record_outputs()

    def record_outputs(self) -> None:
        """Add to the manifest what appeared in the folder since the run began: this run made it."""
        if self.manifest is None:
            return
        made = {path: is_folder for path, is_folder in walk(self.folder).items() if path not in self.found_at_start}
        files = {path for path, is_folder in made.items() if not is_folder} - self.manifest.files
        folders = {path for path, is_folder in made.items() if is_folder} - self.manifest.folders
        if files or folders:
            self.manifest.files |= files
            self.manifest.folders |= folders
            self.manifest.write()

    def __enter__(self) -> Run:
        return self

    def abandon(self) -> None:
        """A run refused before it started (its folder or file in use, earlier outputs): release its locks, remove
        its scratch space and the folders it created when they are empty, touching nothing else."""
        for lock_path, descriptor in reversed(self.locks):
            release_lock(lock_path, descriptor)
        self.locks.clear()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
        if self.folder in self.created:
            self._remove_own_folder()
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty

    def _remove_own_folder(self) -> bool:
        """Remove the folder this run created, when it holds nothing but this run's logs, manifest and lock (a
        file someone put there meanwhile keeps it), and the empty folders created above it; whether it is gone."""
        for name in (*LOG_FILE_NAMES, MANIFEST_FILE_NAME, LOCK_FILE_NAME):
            (self.folder / name).unlink(missing_ok=True)
        for folder in reversed(self.created[: self.created.index(self.folder) + 1]):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        return not self.folder.exists()

    def __exit__(self, kind, error, traceback) -> None:
        if not self.owner:
            return
        try:
            if error is not None:  # the traceback goes to debug.log, while it is still open
                logger.debug("stopped by %s", type(error).__name__, exc_info=(kind, error, traceback))
            self.manifest.remove(scratch_only=True)
            with contextlib.suppress(OSError, PRGSError):  # a full disk: what is not recorded is never removed
                self.record_outputs()
                self.manifest.write()
            close_log_files()
            if error is not None:
                error.add_note(self._record_failure(error))
        finally:
            for lock_path, descriptor in reversed(self.locks):
                release_lock(lock_path, descriptor)
            self.locks.clear()

    def _record_failure(self, error: BaseException) -> str:
        """Remove the folder when it holds nothing but this run's logs and this run made it, else write
        failed.json; returns the sentence saying what was kept."""
        outputs = [n for n in self.manifest.outputs() if n not in (*LOG_FILE_NAMES, FAILED_FILE_NAME)]
        if not outputs and self.folder in self.created:
            if self._remove_own_folder():
                return f"nothing was kept: the run folder {self.folder} was removed"
            return f"nothing was kept: {self.folder} holds nothing of this run"
        kept = [f"{name} ({self.kept[name]})" if name in self.kept else name for name in outputs]
        record = {
            "error": f"{type(error).__name__}: {error}",
            "stopped": datetime.now().isoformat(timespec="seconds"),
            "kept": kept,
        }
        with contextlib.suppress(OSError):  # a full disk may refuse even this
            atomic_write_text(self.folder / FAILED_FILE_NAME, json.dumps(record, indent=2))
            self.manifest.files.add(FAILED_FILE_NAME)
            self.manifest.write()
        if not outputs:
            return f"nothing was kept: {self.folder} holds the logs of this failed run"
        return f"kept in {self.folder}: {', '.join(kept)}"


def start_run(args, resumes_in_place: bool = False, output_files: Sequence[str | Path] = ()) -> Run:
    """The prologue of every script, on every rank: its device, its output folder (--output_folder, else
    logs/<save_dir>/<timestamp>) locked for this run, its scratch space, logging into it, the command line and
    arguments logged, the seeds set; the Run, used as a context manager.

    A folder holding an earlier run's outputs (what its manifest names) is refused unless --overwrite (which
    removes them, and nothing else, first) or ``resumes_in_place`` (a training run resuming its own last.pth); a
    folder holding files that no run of this project made is refused, as is an --overwrite that would remove a file
    the run reads (take_over_folder). ``output_files`` (e.g. the hard-negative file) are locked too, and refused
    when they exist, unless --overwrite.

    Under torchrun with several processes, rank 0 makes, locks and owns the output folder (what a failed run keeps
    is its to say) and tells the others where it and the scratch space are; the other ranks log only errors, to
    the console, marked with their rank. A rank 0 that cannot start the run (a folder in use, earlier outputs)
    stops every rank with its message."""
    started = time.perf_counter()
    if distributed.launched_world_size() == 1:
        return _start_owned_run(args, resolve_device(args.device), started, resumes_in_place, output_files)
    device = distributed.init(args.device, args.dist_timeout)
    run = None
    with distributed.stop_together("starting the run"):
        if distributed.is_main():
            run = _start_owned_run(args, device, started, resumes_in_place, output_files)
            logger.info("distributed: %s, rank 0 on %s", distributed.launch_summary(), device)
    places = distributed.broadcast_object((str(run.folder), str(run.scratch)) if run is not None else None)
    folder, scratch = map(Path, places)
    if run is None:
        setup_logging(None, logging.ERROR, rank_marker=distributed.rank())
        set_seed(args.seed)
        run = Run(folder, device, started, owner=False, scratch=scratch)
    with distributed.stop_together("starting the run"):
        if not folder.is_dir():
            raise distributed.DistributedError(
                f"rank {distributed.rank()} on {socket.gethostname()} cannot see the output folder {folder} that "
                "rank 0 made: every rank reads and writes the run's work files there (put --output_folder on a "
                "filesystem that every machine mounts)"
            )
    return run


def _start_owned_run(
    args, device: torch.device, started: float, resumes_in_place: bool, output_files: Sequence[str | Path]
) -> Run:
    """start_run in the process that owns the output folder (the only one, or rank 0): make and lock the folder,
    claim the output files, refuse or remove earlier outputs, make the scratch space, record the run's own files in
    the manifest, start logging into the folder, log the command line, seed."""
    folder, created = make_output_folder(args.save_dir, exact_folder=args.output_folder)
    run = Run(folder, device, started, created)
    try:
        run.lock(folder / LOCK_FILE_NAME, f"output folder {folder}")
        for path in map(Path, output_files):
            _claim_output_file(run, path, args.overwrite)
        manifest, removed = take_over_folder(folder, args, resumes_in_place, output_files)
        if FAILED_FILE_NAME in manifest.files:  # an earlier run's failure record: this run replaces it
            (folder / FAILED_FILE_NAME).unlink(missing_ok=True)
            manifest.files.discard(FAILED_FILE_NAME)
        run.found_at_start = set(walk(folder))
        run.scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=folder))
        manifest.files |= set(LOG_FILE_NAMES)  # setup_logging makes them below
        manifest.folders.add(run.scratch.name)
        manifest.write()
        run.manifest = manifest
        setup_logging(folder)
    except BaseException:
        run.abandon()
        raise
    logger.info("python %s", " ".join(sys.argv))
    logger.info("arguments: %s", plain_args(args))
    logger.info("outputs in %s", folder)
    if removed:
        logger.info("--overwrite: removed the earlier run's %s", ", ".join(removed))
    set_seed(args.seed)
    return run


def _claim_output_file(run: Run, path: Path, overwrite: bool) -> None:
    """Lock an output file of the run (beside it) and check it can be written: not a folder, its folder creatable,
    and not an existing file unless overwrite."""
    if path.is_dir():
        raise RunFolderError(f"{path} is a folder; expected the path of a file to write")
    run.created.extend(folder for folder in make_folders(path.parent, "the folder of") if folder not in run.created)
    run.lock(path.parent / f".{path.name}.lock", f"{path}")
    if path.exists() and not overwrite:
        raise RunFolderError(
            f"{path} exists (from an earlier run); pass --overwrite to replace it, or choose another path"
        )


def run_entry_point(main: Callable[[], Any]) -> None:
    """Run a script's main(). The project's own errors (PRGSError: a bad dataset, image, checkpoint, mining file or
    output folder, a failed write), missing files and other system errors end the program with one line on stderr
    (exit status 2) instead of a traceback, which goes to debug.log; Ctrl-C (or SIGTERM) ends it with one line
    saying what was kept (exit status 130). The line ends with the note the run added (what was kept).

    Under torchrun, a rank whose main() fails exits at once without waiting for the others: torchrun then stops
    them, and a rank blocked at a collective fails at the latest after --dist_timeout minutes. A rank that is done
    leaves the process group without waiting for rank 0 to finish writing (no barrier: rank 0's last steps may take
    longer than the timeout); torchrun waits for all."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        main()
    except KeyboardInterrupt as error:
        logger.debug("interrupted", exc_info=True)
        notes = getattr(error, "__notes__", [])
        print(f"\ninterrupted: {notes[-1] if notes else 'nothing was written'}", file=sys.stderr)
        sys.exit(130)
    except (PRGSError, OSError) as error:
        logger.debug("stopped by %s", type(error).__name__, exc_info=True)
        notes = getattr(error, "__notes__", [])
        message = str(error) if isinstance(error, PRGSError) else _describe_os_error(error)
        print(f"error: {message}" + (f" ({notes[-1]})" if notes else ""), file=sys.stderr)
        sys.exit(2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    distributed.leave()


def _interrupt(signal_number: int, frame) -> None:
    """SIGTERM: stop like Ctrl-C, so the run cleans up and says what was kept."""
    raise KeyboardInterrupt(f"signal {signal_number}")


def _describe_os_error(error: OSError) -> str:
    """One line for a system error: the file, the reason (and the free space when writing failed)."""
    where = f" {error.filename}" if error.filename else ""
    if isinstance(error, FileNotFoundError):
        return f"file not found:{where}" if where else str(error)
    reason = describe_write_error(error, Path(error.filename).parent) if error.filename else str(error)
    return f"{type(error).__name__}{where}: {reason}"
