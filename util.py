"""The bottom of the project, importing no other module of it: the base error class, devices and autocast, timing,
seeds and RNG state, atomic writes, file hashes and counting parameters. The run life cycle (output folder, lock,
logging, signals) is runs.py."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn


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


def file_sha1(path: str | Path) -> str:
    """The SHA-1 of a file's bytes, hex (read in 4 MiB chunks)."""
    digest = hashlib.sha1()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
