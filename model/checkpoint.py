"""Checkpoints: this project's format, the reference's two layouts, ImageNet initialisation from local files, and the
one function that builds a run's model. The format of this project's checkpoints is described in docs/checkpoints.md.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import DEIT_SIZES, RESNETS, ResNetBackbone
from model.network import ModelConfig, PRGSNetwork
from util import PRGSError, atomic_save

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "prgs-checkpoint"
CHECKPOINT_VERSION = 1
MAX_LISTED_KEYS = 20


class CheckpointError(PRGSError, ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says which file and which keys."""


def read_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint file on the CPU without executing pickled code (numpy arrays allowed for the reference's)."""
    path = checked_checkpoint_path(path)
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
    check_finite(state, path)
    return state


def checked_checkpoint_path(path: str | Path, weights_only: bool = False) -> Path:
    """``path`` as a Path when it is a file; CheckpointError saying it is missing or a folder otherwise.
    weights_only: the file is ImageNet weights (read_state_dict_file), not a checkpoint."""
    path = Path(path)
    if path.is_dir():
        expected = "a weights file" if weights_only else f"a checkpoint file (e.g. {path / 'best.pth'})"
        raise CheckpointError(f"{path} is a folder, expected {expected}")
    if not path.is_file():
        raise CheckpointError(f"{'weights file' if weights_only else 'checkpoint'} not found: {path}")
    return path


def check_finite(state: Any, path: str | Path, key: str = "") -> None:
    """CheckpointError naming the first floating-point tensor of ``state`` (nested dicts, lists and tuples) that
    holds a NaN or an infinity, with its key and ``path``: one such weight turns every score into NaN."""
    if isinstance(state, torch.Tensor):
        if (state.is_floating_point() or state.is_complex()) and not bool(torch.isfinite(state).all()):
            bad = int((~torch.isfinite(state)).sum())
            raise CheckpointError(
                f"checkpoint {path}: tensor {key} {tuple(state.shape)} holds {bad} NaN or infinite value(s); "
                "the file is corrupt or was saved from a diverged run"
            )
    elif isinstance(state, dict):
        for name, value in state.items():
            check_finite(value, path, f"{key}.{name}" if key else str(name))
    elif isinstance(state, (list, tuple)):
        for number, value in enumerate(state):
            check_finite(value, path, f"{key}[{number}]")


def _numpy_globals() -> list:
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [
        multiarray._reconstruct,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.float64)),
        type(np.dtype(np.float32)),
        type(np.dtype(np.int64)),
        np.float64,
        np.float32,
        np.int64,
    ]


@dataclass
class LoadedCheckpoint:
    path: Path
    layout: str  # "prgs" (ours), "reference_full" or "reference_global"
    model_config: ModelConfig | None  # ours only; the reference's files carry none
    state: dict = field(repr=False)  # the whole file (training state, args, metrics for ours)


def checkpoint_layout(state: dict) -> str:
    """'prgs', 'reference_full' (module.backbone/local_head/Reranker) or 'reference_global' (module.<vit key>)."""
    if state.get("format") == CHECKPOINT_FORMAT:
        return "prgs"
    weights = state.get("model_state_dict", state)
    keys = [k[len("module.") :] if k.startswith("module.") else k for k in weights if isinstance(k, str)]
    if any(k.startswith(("backbone.", "local_head.", "Reranker.", "reranker.")) for k in keys):
        return "reference_full"
    if any(k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "conv1.weight") for k in keys):
        return "reference_global"
    raise CheckpointError(
        "unrecognised checkpoint: expected this project's format, the reference's full PRGS "
        "checkpoint (module.backbone.* / module.local_head.* / module.Reranker.*) or its "
        f"global-only DeiT checkpoint (module.cls_token, ...); first keys: {keys[:5]}"
    )


def normalised_weights(state: dict, layout: str) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint under this project's names (no 'module.', 'reranker.' lower case)."""
    if layout == "prgs":
        return dict(state["model_state_dict"])
    weights = state.get("model_state_dict", state)
    renamed = {}
    for key, value in weights.items():
        key = key[len("module.") :] if key.startswith("module.") else key
        if layout == "reference_global":
            key = f"backbone.{key}"
        elif key.startswith("Reranker."):
            key = "reranker." + key[len("Reranker.") :]
        renamed[key] = value
    return renamed


def check_state_dict_compatible(
    target: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], source: str, expected: set[str] | None = None
) -> None:
    """Raise CheckpointError naming every missing, unexpected and mis-shaped key of ``weights`` against ``target``.

    ``expected`` (default: every key of ``target``) is the set of keys ``weights`` must provide.
    """
    expected = set(target) if expected is None else expected
    missing = sorted(expected - set(weights))
    unexpected = sorted(set(weights) - set(target))
    misshaped = sorted(
        f"{k}: file {tuple(weights[k].shape)}, model {tuple(target[k].shape)}"
        for k in set(weights) & set(target)
        if tuple(weights[k].shape) != tuple(target[k].shape)
    )
    problems = [
        (name, keys)
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
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
    path = checked_checkpoint_path(path)
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
            logger.warning(
                "non-strict load of %s: %d key(s) skipped (unexpected or mis-shaped): %s; %d missing: %s",
                path,
                len(skipped),
                skipped[:MAX_LISTED_KEYS],
                len(missing),
                missing[:MAX_LISTED_KEYS],
            )
        weights = usable
    model.load_state_dict(weights, strict=False)
    if layout == "reference_global":
        logger.info(
            "loaded the global-only backbone checkpoint %s; local_head and the reranker keep their initialisation", path
        )


def build_model(
    config: ModelConfig, resume: str | Path | None = None, backbone_weights: str | None = "auto", strict: bool = True
) -> tuple[PRGSNetwork, LoadedCheckpoint | None]:
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
            logger.warning(
                "no ImageNet weights for %s in timm's or torchvision's local cache: the backbone starts "
                "from random weights. Pass --backbone_weights PATH (e.g. timm's "
                "deit_small_distilled_patch16_224 .safetensors/.pth) or --resume a checkpoint.",
                config.backbone,
            )
        else:
            load_imagenet_weights(model.backbone, found)
    else:
        load_imagenet_weights(model.backbone, Path(backbone_weights))
    return model, None


def checkpoint_payload(model: PRGSNetwork, **extra: Any) -> dict:
    """This project's checkpoint: format/version, model configuration and weights (never 'module.' keys), plus
    ``extra`` entries (training state, arguments, metrics)."""
    weights = {k.removeprefix("module."): v.detach().cpu() for k, v in model.state_dict().items()}
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model_config": model.config.to_dict(),
        "model_state_dict": weights,
        "created": datetime.now().isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
        **extra,
    }


def save_model(model: PRGSNetwork, path: str | Path, **extra: Any) -> None:
    """Write ``checkpoint_payload(model, **extra)`` atomically."""
    atomic_save(checkpoint_payload(model, **extra), path)


# ----------------------------------------------------------------------------------------------------------------
# ImageNet initialisation from local files (nothing is downloaded)


def cached_imagenet_weights(name: str) -> Path | None:
    """The ImageNet weights of backbone ``name`` in timm's / torchvision's local caches, or None."""
    if name in DEIT_SIZES and DEIT_SIZES[name].timm_name:
        timm_name = DEIT_SIZES[name].timm_name
        try:
            from huggingface_hub import try_to_load_from_cache  # optional: timm's cache, when installed

            for filename in ("model.safetensors", "pytorch_model.bin"):
                found = try_to_load_from_cache(f"timm/{timm_name}.fb_in1k", filename)
                if isinstance(found, str):
                    return Path(found)
        except ImportError:
            pass
        prefix = timm_name
    elif name in RESNETS:
        prefix = name
    else:
        return None
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    candidates = sorted(checkpoints.glob(f"{prefix}-*.pth")) if checkpoints.is_dir() else []
    return candidates[0] if candidates else None


def read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .pth / .bin file (unwrapping a {'model': ...} or {'state_dict': ...} dict)."""
    path = checked_checkpoint_path(path, weights_only=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # optional: only ImageNet files in that format need it

        state = load_file(str(path), device="cpu")
        check_finite(state, path)
        return state
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read weights file {path}: {error}") from error
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected a dict of tensors (a state dict)")
    check_finite(state, path)
    return state


def load_imagenet_weights(backbone: nn.Module, path: Path) -> None:
    """Initialise ``backbone`` from ImageNet weights of the same architecture (timm DeiT or torchvision ResNet).

    DeiT: the 14x14 positional grid is resized (bilinear) to the backbone's grid, and ``head`` / ``head_dist`` take
    the first ``out_dim`` rows of the ImageNet classifiers (each from its own classifier; the reference copied
    ``head`` into both). ResNet: the ImageNet ``fc`` is dropped. Any other missing, unexpected or mis-shaped key is
    an error naming it.
    """
    source = read_state_dict_file(path)
    target = backbone.state_dict()
    adapted: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        if isinstance(backbone, ResNetBackbone) and key.startswith("fc."):
            continue
        if key == "pos_embed" and key in target and value.shape != target[key].shape:
            prefix, patches = value[:, :2], value[:, 2:]
            side = math.isqrt(patches.shape[1])
            if side * side != patches.shape[1]:
                raise CheckpointError(
                    f"{path}: pos_embed has {patches.shape[1]} patch positions, expected a square "
                    f"grid (196 for timm's 224x224 DeiT)"
                )
            patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, C, side, side)
            patches = F.interpolate(patches, size=backbone.built_grid, mode="bilinear", align_corners=False)
            value = torch.cat([prefix, patches.flatten(2).transpose(1, 2)], dim=1)
        elif key.startswith(("head.", "head_dist.")) and key in target and value.shape != target[key].shape:
            rows = target[key].shape[0]
            if value.shape[0] < rows:
                continue  # a descriptor wider than the ImageNet classifier keeps its random init
            value = value[:rows]
        adapted[key] = value
    if isinstance(backbone, ResNetBackbone):
        for key in ("gem.p", "fc.weight", "fc.bias"):
            adapted.setdefault(key, target[key])
    for key in ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias"):
        if key in target:
            adapted.setdefault(key, target[key])
    check_state_dict_compatible(target, adapted, source=str(path))
    backbone.load_state_dict(adapted)
    logger.info("initialised the %s backbone from ImageNet weights %s", type(backbone).__name__, path)
