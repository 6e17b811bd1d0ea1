"""The bottom of the project, importing no other module of it: the base error class, devices and autocast, seeds and
RNG state, timing, atomic writes, and a run's folder and logging."""

from __future__ import annotations

import logging
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

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


class CudaGraphCache:
    """Replays a CUDA graph of ``function(x)`` captured once per input shape (at most ``max_graphs`` shapes; others
    run eagerly): one launch instead of one per operation, for fixed shapes. The first call for a shape warms up
    on a side stream (so that lazy set-up such as kernel tuning is not captured), then captures. The returned
    tensor is the graph's static output: valid until the next call, copy it to keep it."""

    def __init__(self, function: Callable[[torch.Tensor], torch.Tensor], max_graphs: int = 2, warmup: int = 2):
        self.function, self.max_graphs, self.warmup = function, max_graphs, warmup
        self.graphs: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs or x.device.type != "cuda":
                return self.function(x)
            self.graphs[key] = self._capture(x)
        static_input, static_output, graph = self.graphs[key]
        static_input.copy_(x)
        graph.replay()
        return static_output

    def _capture(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]:
        static_input = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.function(static_input)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_output = self.function(static_input)
        return static_input, static_output, graph


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


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(binary file) on a temporary file in path's folder, then rename it onto path: a crash or an error
    never leaves a half-written file, and the previous file stays until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_save(payload: Any, path: str | Path) -> None:
    """torch.save through atomic_write."""
    atomic_write(path, lambda file: torch.save(payload, file))


# ----------------------------------------------------------------------------------------------------------------
# A run: output folder, logging, seed, device


def make_output_folder(save_dir: str, logs_root: str | Path = "logs", exact_folder: str | Path | None = None) -> Path:
    """logs/<save_dir>/<YYYY-mm-dd_HH-MM-SS> (a suffix keeps two runs of the same second apart), or exact_folder."""
    if exact_folder is not None:
        Path(exact_folder).mkdir(parents=True, exist_ok=True)
        return Path(exact_folder)
    base = Path(logs_root) / save_dir / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    folder, suffix = base, 1
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=False)
            return folder
        except FileExistsError:
            folder = base.with_name(f"{base.name}_{suffix}")
            suffix += 1


def setup_logging(output_folder: Path | None, console_level: int = logging.INFO) -> None:
    """info.log (INFO) and debug.log (DEBUG) in ``output_folder``, and the console at ``console_level``.

    Replaces the handlers an earlier call installed (other handlers, e.g. pytest's, stay)."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_prgs_handler", False)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.DEBUG)
    formatter = logging.Formatter("%(asctime)s   %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    handlers[0].setLevel(console_level)
    if output_folder is not None:
        for name, level in (("info.log", logging.INFO), ("debug.log", logging.DEBUG)):
            handler = logging.FileHandler(Path(output_folder) / name)
            handler.setLevel(level)
            handlers.append(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._prgs_handler = True
        root.addHandler(handler)
    for noisy in ("PIL", "matplotlib", "urllib3", "timm", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def plain_args(args) -> dict:
    """The parsed flags as JSON-ready values (tuples as lists), without the derived model configuration."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "model_config"}


@dataclass
class Run:
    """What every script's run starts with."""

    folder: Path  # where its outputs go
    device: torch.device
    started: float  # time.perf_counter() at the start

    def seconds(self) -> float:
        return time.perf_counter() - self.started


def start_run(args) -> Run:
    """The prologue of every script: its output folder (--output_folder, else logs/<save_dir>/<timestamp>), logging
    into it, the command line and arguments logged, the seeds set, the device resolved."""
    started = time.perf_counter()
    device = resolve_device(args.device)
    folder = make_output_folder(args.save_dir, exact_folder=args.output_folder)
    setup_logging(folder)
    logger.info("python %s", " ".join(sys.argv))
    logger.info("arguments: %s", plain_args(args))
    logger.info("outputs in %s", folder)
    set_seed(args.seed)
    return Run(folder, device, started)


def run_entry_point(main: Callable[[], Any]) -> None:
    """Run a script's main(); the project's own errors (PRGSError: a bad dataset, image, checkpoint or mining file)
    and missing files end the program with their one-line message on stderr (exit status 2) instead of a traceback,
    which goes to debug.log."""
    try:
        main()
    except (PRGSError, FileNotFoundError) as error:
        logger.debug("stopped by %s", type(error).__name__, exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
