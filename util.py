"""Checkpoints (this project's format and the reference's two layouts), logging, seeding, devices and timing."""
from __future__ import annotations

import functools
import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from model.backbone import cached_imagenet_weights, load_imagenet_weights
from model.network import ModelConfig, PRGSNetwork

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "prgs-checkpoint"
CHECKPOINT_VERSION = 1
MAX_LISTED_KEYS = 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which file and which keys."""


# ----------------------------------------------------------------------------------------------------------------
# Devices, seeds, timing

def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch sees no CUDA device "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu or auto")
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

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """The state of every random generator training uses, in plain types a weights-only load accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": list(map(_to_plain, random.getstate())),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_plain(value):
    return list(value) if isinstance(value, tuple) else value


def set_rng_states(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Output folders and logging

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


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints

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


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file on the CPU without executing pickled code (numpy arrays allowed for the reference's)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first_error:  # the reference's files hold numpy arrays ('recalls')
        try:
            with torch.serialization.safe_globals(_numpy_globals()):
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            raise CheckpointError(f"cannot read checkpoint {path}: {first_error}") from first_error
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a checkpoint dict")
    return state


def _numpy_globals() -> list:
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.float64)), type(np.dtype(np.float32)),
            type(np.dtype(np.int64)), np.float64, np.float32, np.int64]


@dataclass
class LoadedCheckpoint:
    path: Path
    layout: str                          # "prgs" (ours), "reference_full" or "reference_global"
    model_config: ModelConfig | None     # ours only; the reference's files carry none
    state: dict = field(repr=False)      # the whole file (training state, args, metrics for ours)


def checkpoint_layout(state: dict) -> str:
    """'prgs', 'reference_full' (module.backbone/local_head/Reranker) or 'reference_global' (module.<vit key>)."""
    if state.get("format") == CHECKPOINT_FORMAT:
        return "prgs"
    weights = state.get("model_state_dict", state)
    keys = [k[len("module."):] if k.startswith("module.") else k for k in weights if isinstance(k, str)]
    if any(k.startswith(("backbone.", "local_head.", "Reranker.", "reranker.")) for k in keys):
        return "reference_full"
    if any(k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "conv1.weight") for k in keys):
        return "reference_global"
    raise CheckpointError("unrecognised checkpoint: expected this project's format, the reference's full PRGS "
                          "checkpoint (module.backbone.* / module.local_head.* / module.Reranker.*) or its "
                          f"global-only DeiT checkpoint (module.cls_token, ...); first keys: {keys[:5]}")


def normalised_weights(state: dict, layout: str) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint under this project's names (no 'module.', 'reranker.' lower case)."""
    if layout == "prgs":
        return dict(state["model_state_dict"])
    weights = state.get("model_state_dict", state)
    renamed = {}
    for key, value in weights.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if layout == "reference_global":
            key = f"backbone.{key}"
        elif key.startswith("Reranker."):
            key = "reranker." + key[len("Reranker."):]
        renamed[key] = value
    return renamed


def check_state_dict_compatible(target: dict[str, torch.Tensor], weights: dict[str, torch.Tensor],
                                source: str, expected: set[str] | None = None) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key of ``weights`` against ``target``.

    ``expected`` (default: every key of ``target``) is the set of keys ``weights`` must provide.
    """
    expected = set(target) if expected is None else expected
    missing = sorted(expected - set(weights))
    unexpected = sorted(set(weights) - set(target))
    misshaped = sorted(f"{k}: file {tuple(weights[k].shape)}, model {tuple(target[k].shape)}"
                       for k in set(weights) & set(target) if tuple(weights[k].shape) != tuple(target[k].shape))
    problems = [(name, keys) for name, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("mis-shaped", misshaped)) if keys]
    if problems:
        lines = [f"{source} does not fit the model:"]
        for name, keys in problems:
            shown = keys[:MAX_LISTED_KEYS]
            more = f" (and {len(keys) - len(shown)} more)" if len(keys) > len(shown) else ""
            lines.append(f"  {len(keys)} {name} key(s){more}: " + ", ".join(shown))
        raise CheckpointError("\n".join(lines))


def open_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read a checkpoint of any supported layout and say which it is (and, for ours, the model configuration).

    The last file read is kept (keyed by path, size and modification time): the parser and the model builder of one
    run read the --resume file once."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    stat = path.stat()
    return _open_checkpoint(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _open_checkpoint(path: str, size: int, modified_ns: int) -> LoadedCheckpoint:
    state = read_checkpoint(path)
    layout = checkpoint_layout(state)
    config = ModelConfig.from_dict(state["model_config"]) if layout == "prgs" else None
    return LoadedCheckpoint(Path(path), layout, config, state)


def load_weights(model: PRGSNetwork, checkpoint: LoadedCheckpoint, strict: bool = True) -> None:
    """Load an opened checkpoint of any supported layout into ``model``.

    strict (default): every key the layout provides must exist in the model with the same shape, and every key the
    layout is expected to provide must be there (the whole model for ours and the reference's full checkpoint, the
    backbone for the global-only one); otherwise a CheckpointError lists the offending keys. Non-strict: the
    matching keys load and the rest is logged.
    """
    path, layout = checkpoint.path, checkpoint.layout
    weights = normalised_weights(checkpoint.state, layout)
    target = model.state_dict()
    expected = {k for k in target if k.startswith("backbone.")} if layout == "reference_global" else set(target)
    if strict:
        check_state_dict_compatible(target, weights, source=f"checkpoint {path} ({layout} layout)", expected=expected)
    else:
        usable = {k: v for k, v in weights.items() if k in target and v.shape == target[k].shape}
        skipped = sorted(set(weights) - set(usable))
        missing = sorted(expected - set(usable))
        if skipped or missing:
            logger.warning("non-strict load of %s: %d key(s) skipped (unexpected or mis-shaped): %s; %d missing: %s",
                           path, len(skipped), skipped[:MAX_LISTED_KEYS], len(missing), missing[:MAX_LISTED_KEYS])
        weights = usable
    model.load_state_dict(weights, strict=False)
    if layout == "reference_global":
        logger.info("loaded the global-only backbone checkpoint %s; local_head and the reranker keep their "
                    "initialisation", path)


def build_model(config: ModelConfig, resume: str | Path | None = None, backbone_weights: str | None = "auto",
                strict: bool = True) -> tuple[PRGSNetwork, LoadedCheckpoint | None]:
    """The network for a run: from ``resume`` when given (our checkpoints rebuild their own configuration, the
    reference's use ``config``), else ``config`` with the backbone initialised from ``backbone_weights``:
    a file path, 'auto' (timm's / torchvision's local cache if the weights are there, else random with a warning),
    or 'none' (random)."""
    if resume is not None:
        checkpoint = open_checkpoint(resume)
        if checkpoint.model_config is not None and checkpoint.model_config != config:
            logger.info("building the model from the configuration stored in %s: %s", resume, checkpoint.model_config)
        model = PRGSNetwork(checkpoint.model_config or config)
        load_weights(model, checkpoint, strict=strict)
        return model, checkpoint
    model = PRGSNetwork(config)
    if backbone_weights in (None, "none"):
        logger.info("backbone initialised at random (--backbone_weights none)")
    elif backbone_weights == "auto":
        found = cached_imagenet_weights(config.backbone)
        if found is None:
            logger.warning("no ImageNet weights for %s in timm's or torchvision's local cache: the backbone starts "
                           "from random weights. Pass --backbone_weights PATH (e.g. timm's "
                           "deit_small_distilled_patch16_224 .safetensors/.pth) or --resume a checkpoint.",
                           config.backbone)
        else:
            load_imagenet_weights(model.backbone, found)
    else:
        load_imagenet_weights(model.backbone, Path(backbone_weights))
    return model, None


def checkpoint_payload(model: PRGSNetwork, **extra: Any) -> dict:
    """This project's checkpoint: format/version, model configuration and weights (never 'module.' keys), plus
    ``extra`` entries (training state, arguments, metrics)."""
    weights = {k.removeprefix("module."): v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model_config": model.config.to_dict(),
            "model_state_dict": weights, "created": datetime.now().isoformat(timespec="seconds"),
            "torch_version": str(torch.__version__), **extra}


def save_model(model: PRGSNetwork, path: str | Path, **extra: Any) -> None:
    """Write ``checkpoint_payload(model, **extra)`` atomically."""
    atomic_save(checkpoint_payload(model, **extra), path)


def start_run(args) -> Path:
    """The output folder of a script's run (--output_folder, else logs/<save_dir>/<timestamp>), with logging set up
    and the command line and arguments logged."""
    output_folder = make_output_folder(args.save_dir, exact_folder=args.output_folder)
    setup_logging(output_folder)
    logger.info("python %s", " ".join(sys.argv))
    logger.info("arguments: %s", plain_args(args))
    logger.info("outputs in %s", output_folder)
    return output_folder


def plain_args(args) -> dict:
    """The parsed flags as JSON-ready values (tuples as lists), without the derived model configuration."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "model_config"}


def run_entry_point(main) -> None:
    """Run a script's main(); the project's own errors (bad dataset, image, checkpoint or mining file) end the
    program with their one-line message on stderr (exit status 2) instead of a traceback (kept in debug.log)."""
    from datasets_ws import BadImageError, DatasetError
    from mining import MiningFileError

    try:
        main()
    except (DatasetError, BadImageError, CheckpointError, MiningFileError, FileNotFoundError) as error:
        logger.debug("stopped by %s", type(error).__name__, exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
