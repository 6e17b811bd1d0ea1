"""The bottom of the project, importing no other module of it: the base error class, devices and autocast, seeds and
RNG state, timing, atomic writes, and a run's folder (locked, never shared, cleaned up on every exit path) and
logging."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

logger = logging.getLogger(__name__)


class PRGSError(Exception):
    """Base class of every error this project raises on purpose: bad input (a dataset, an image, a checkpoint, a
    mining file) whose message names the file, the value and what was expected. The scripts print it as one line."""


class DeviceError(PRGSError, RuntimeError):
    """A device that was asked for and is not there."""


# ----------------------------------------------------------------------------------------------------------------
# Devices, precision, timing


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "--device cuda was requested but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu or auto"
        )
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """Context manager: bf16 autocast when precision == 'bf16', else a no-op."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates wall-clock seconds over ``with`` blocks, synchronising the device so GPU work is counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ----------------------------------------------------------------------------------------------------------------
# Seeds and RNG state


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """The state of every random generator training uses, in plain types a weights-only load accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [list(v) if isinstance(v, tuple) else v for v in random.getstate()],
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: dict[str, Any]) -> None:
    """Restore what ``rng_states`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes


class OutputWriteError(PRGSError, OSError):
    """A file that could not be written (full disk, no permission, a folder in the way); the message names it."""


def describe_write_error(error: BaseException, folder: str | Path) -> str:
    """The reason of a failed write, with the free space left where it was writing (a full disk says so)."""
    text = f"{error.strerror} (errno {error.errno})" if isinstance(error, OSError) and error.strerror else str(error)
    existing = Path(folder).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free_mb = shutil.disk_usage(existing).free / 2**20
    except OSError:
        return text
    return f"{text}; {free_mb:.0f} MB free on the disk of {existing}"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(binary file) on a temporary file in path's folder, then rename it onto path: a crash or an error
    never leaves a half-written file, and the previous file stays until the new one is complete. A failed write
    (e.g. a full disk) raises OutputWriteError naming path."""
    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)) and not isinstance(error, PRGSError):
            # torch.save reports a failed write of its file object as a RuntimeError
            raise OutputWriteError(f"cannot write {path}: {describe_write_error(error, path.parent)}") from error
        raise


def atomic_save(payload: Any, path: str | Path) -> None:
    """torch.save through atomic_write."""
    atomic_write(path, lambda file: torch.save(payload, file))


def atomic_write_text(path: str | Path, text: str) -> None:
    """A text file (UTF-8) through atomic_write."""
    atomic_write(path, lambda file: file.write(text.encode()))


# ----------------------------------------------------------------------------------------------------------------
# A run's folder: created, locked, never shared, cleaned up on every exit path

LOCK_FILE_NAME = ".prgs_run.lock"
FAILED_FILE_NAME = "failed.json"
LOG_FILE_NAMES = ("info.log", "debug.log")
SCRATCH_NAMES = ("work", "local_features")  # scratch space of the evaluations, removed when the run ends
# What the scripts write into a run folder; --overwrite removes these, and only these, before a run starts.
RUN_OUTPUT_PATTERNS = (
    "results.json",
    "predictions.csv",
    "predictions",
    "*.pth",
    "training_curves.png",
    "test",
    "msls_submission_*",
    *LOG_FILE_NAMES,
    FAILED_FILE_NAME,
)


class RunFolderError(PRGSError):
    """An output folder or file that a run may not use: another run holds it, it holds earlier results, or it is
    not a folder. The message names it and says what to do."""


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
        return folder, _make_folders(folder, "--output_folder")
    base = Path(logs_root) / save_dir / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    created = _make_folders(base.parent, "the logs folder")
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


def _make_folders(folder: Path, what: str) -> list[Path]:
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


def earlier_outputs(folder: Path) -> list[str]:
    """Names of what an earlier run left in folder: everything but hidden files (the lock, temporaries), the scratch
    space, and the logs of a run that failed before producing anything."""
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    ignored = set(SCRATCH_NAMES)
    if FAILED_FILE_NAME in names and set(names) <= {FAILED_FILE_NAME, *LOG_FILE_NAMES, *SCRATCH_NAMES}:
        ignored |= {FAILED_FILE_NAME, *LOG_FILE_NAMES}  # a failed run that produced nothing but its logs
    return [name for name in names if name not in ignored and not name.startswith(".")]  # hidden: lock, temporaries


def remove_run_outputs(folder: Path) -> list[str]:
    """Delete what the scripts write into a run folder (RUN_OUTPUT_PATTERNS), nothing else; the names removed."""
    removed = []
    for pattern in RUN_OUTPUT_PATTERNS:
        for path in sorted(folder.glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    return removed


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


def setup_logging(output_folder: Path | None, console_level: int = logging.INFO) -> None:
    """info.log (INFO) and debug.log (DEBUG) in ``output_folder``, and the console at ``console_level``.

    Replaces the handlers an earlier call installed (other handlers, e.g. pytest's, stay)."""
    close_log_files(console_too=True)
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    formatter = logging.Formatter("%(asctime)s   %(message)s", "%Y-%m-%d %H:%M:%S")
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

    On the way out, whatever the way (success, an error, Ctrl-C, a full disk), the scratch space is removed and the
    locks are released. A run that fails leaves either nothing (its folder is removed when it holds only logs and
    this run created it) or a failed.json saying what happened and what its outputs hold; the error gets a note
    with what was kept, which run_entry_point prints."""

    folder: Path  # where its outputs go
    device: torch.device
    started: float  # time.perf_counter() at the start
    created: list[Path] = field(default_factory=list)  # folders this run created, outermost first
    kept: dict[str, str] = field(default_factory=dict)  # output name -> what it holds, for the closing line
    locks: list[tuple[Path, int]] = field(default_factory=list)
    owner: bool = True  # False on the other ranks of a torchrun launch: rank 0 owns the folder and cleans it up

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def lock(self, lock_path: Path, what: str) -> None:
        self.locks.append((lock_path, acquire_lock(lock_path, what)))

    def note(self, name: str, description: str) -> None:
        """Record what an output holds (e.g. 'last.pth': 'end of epoch 3'), for the line a failed run ends with."""
        self.kept[name] = description

    def __enter__(self) -> Run:
        return self

    def abandon(self) -> None:
        """A run refused before it started (its folder or file in use, earlier outputs): release its locks and
        remove the folders it created when they are empty, touching nothing else."""
        for lock_path, descriptor in reversed(self.locks):
            release_lock(lock_path, descriptor)
        self.locks.clear()
        for folder in reversed(self.created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty

    def __exit__(self, kind, error, traceback) -> None:
        if not self.owner:
            return
        try:
            if error is not None:  # the traceback goes to debug.log, while it is still open
                logger.debug("stopped by %s", type(error).__name__, exc_info=(kind, error, traceback))
            for name in SCRATCH_NAMES:
                shutil.rmtree(self.folder / name, ignore_errors=True)
            close_log_files()
            if error is not None:
                error.add_note(self._record_failure(error))
            elif (self.folder / FAILED_FILE_NAME).exists():
                (self.folder / FAILED_FILE_NAME).unlink()
        finally:
            for lock_path, descriptor in reversed(self.locks):
                release_lock(lock_path, descriptor)
            self.locks.clear()

    def _record_failure(self, error: BaseException) -> str:
        """Remove the folder when it holds nothing but logs and this run made it, else write failed.json; returns
        the sentence saying what was kept."""
        outputs = [n for n in earlier_outputs(self.folder) if n not in (*LOG_FILE_NAMES, FAILED_FILE_NAME)]
        if not outputs and self.folder in self.created:
            shutil.rmtree(self.folder, ignore_errors=True)
            for folder in reversed(self.created[: self.created.index(self.folder)]):
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only when empty
            return f"nothing was kept: the run folder {self.folder} was removed"
        kept = [f"{name} ({self.kept[name]})" if name in self.kept else name for name in outputs]
        record = {
            "error": f"{type(error).__name__}: {error}",
            "stopped": datetime.now().isoformat(timespec="seconds"),
            "kept": kept,
        }
        with contextlib.suppress(OSError):  # a full disk may refuse even this
            atomic_write_text(self.folder / FAILED_FILE_NAME, json.dumps(record, indent=2))
        if not outputs:
            return f"nothing was kept: {self.folder} holds the logs of this failed run"
        return f"kept in {self.folder}: {', '.join(kept)}"


def start_run(args, resumes_in_place: bool = False, output_files: Sequence[str | Path] = ()) -> Run:
    """The prologue of every script: its device, its output folder (--output_folder, else
    logs/<save_dir>/<timestamp>) locked for this run, logging into it, the command line and arguments logged, the
    seeds set.

    A folder holding an earlier run's outputs is refused unless --overwrite (which removes them first) or
    ``resumes_in_place`` (a training run resuming its own last.pth). ``output_files`` (e.g. the hard-negative
    file) are locked too, and refused when they exist, unless --overwrite."""
    started = time.perf_counter()
    device = resolve_device(args.device)
    folder, created = make_output_folder(args.save_dir, exact_folder=args.output_folder)
    run = Run(folder, device, started, created)
    try:
        run.lock(folder / LOCK_FILE_NAME, f"output folder {folder}")
        for path in map(Path, output_files):
            _claim_output_file(run, path, args.overwrite)
        earlier = earlier_outputs(folder)
        removed = []
        if earlier and not resumes_in_place:
            if not args.overwrite:
                raise RunFolderError(
                    f"output folder {folder} holds the outputs of an earlier run ({', '.join(earlier[:6])}); "
                    f"pass --overwrite to replace them, or choose another --output_folder"
                )
            removed = remove_run_outputs(folder)
        (folder / FAILED_FILE_NAME).unlink(missing_ok=True)
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
    run.created.extend(folder for folder in _make_folders(path.parent, "the folder of") if folder not in run.created)
    run.lock(path.parent / f".{path.name}.lock", f"{path}")
    if path.exists() and not overwrite:
        raise RunFolderError(
            f"{path} exists (from an earlier run); pass --overwrite to replace it, or choose another path"
        )


def run_entry_point(main: Callable[[], Any]) -> None:
    """Run a script's main(). The project's own errors (PRGSError: a bad dataset, image, checkpoint, mining file or
    output folder, a failed write), missing files and other system errors end the program with one line on stderr
    (exit status 2) instead of a traceback, which goes to debug.log; Ctrl-C (or SIGTERM) ends it with one line
    saying what was kept (exit status 130). The line ends with the note the run added (what was kept)."""
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
