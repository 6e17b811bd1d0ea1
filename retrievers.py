"""Global retrievers in front of the reranker: any model with the torch.hub interface of the VPR anchors (a local
folder with a ``hubconf.py``, or a GitHub ``owner/repo``), named by a preset or by ``SOURCE:ENTRY`` with keyword
arguments, and ``GlobalRetriever``, which turns batches of pixels into L2-normalised descriptors with the model's
own input size and normalisation. How to plug one in, the syntax and the presets' table: docs/retrievers.md.

Nothing is downloaded at run time except the code of a GitHub ``owner/repo`` the user names: weights come from the
file given with the model (``--global_weights``) or from torch's hub cache, and a download the entry point tries is
refused with a message naming the URL and where to put the file.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from model.checkpoint import CheckpointError, check_state_dict_compatible, read_state_dict_file
from places.images import IMAGENET_MEAN, IMAGENET_STD
from util import PRGSError, autocast

logger = logging.getLogger(__name__)

OWN_MODEL = "prgs"  # --global_model's default: PRGS's own global descriptor, no retriever in front
PROJECT_ROOT = Path(__file__).resolve().parent
GITHUB_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+(:[A-Za-z0-9_./-]+)?$")  # owner/repo[:ref]
ENTRY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
INTERPOLATIONS = ("bilinear", "bicubic")


class GlobalModelError(PRGSError, ValueError):
    """A global model that cannot be named, loaded or run; the message names the model, the value and what was
    expected, on one line."""


@dataclass(frozen=True)
class GlobalModelSpec:
    """Where a global model comes from and how it wants its pixels.

    source: a folder holding a hubconf.py (``source_kind`` "local") or ``owner/repo[:ref]`` ("github");
    entry: the hubconf function returning the model, called with ``kwargs``; weights: a local file, either answering
    the entry's own ``torch.hub.load_state_dict_from_url`` call of the same file name, or, when no call asks for it,
    loaded strictly into the returned model. image_size: (H, W) the model is fed, None: the size the images come
    at; each side is then rounded to the nearest multiple of ``side_multiple`` (14 for DINOv2's patches).
    output_index: which element is the descriptor when the model returns a tuple (BoQ returns (descriptor,
    attentions)). descriptor_dim: checked against the output when known.
    """

    name: str
    source: str
    source_kind: str  # "local" | "github"
    entry: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    image_size: tuple[int, int] | None = None
    side_multiple: int = 1
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    output_index: int = 0
    descriptor_dim: int | None = None

    def describe(self) -> str:
        """One line for the logs: what is loaded, from where, at which size."""
        kwargs = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        size = "as given" if self.image_size is None else f"{self.image_size[0]}x{self.image_size[1]}"
        return (
            f"global model {self.name}: {self.entry}({kwargs}) from {self.source_kind} {self.source}, "
            f"input {size} (sides multiple of {self.side_multiple}), weights {self.weights or 'from the entry'}"
        )


@dataclass(frozen=True)
class Preset:
    """A known anchor: its repository's hub entry and the input it was evaluated with (see docs/retrievers.md)."""

    github: str | None  # owner/repo serving the entry; None: upstream has no hubconf.py, give a folder
    entry: str
    kwargs: dict[str, Any]
    image_size: tuple[int, int] | None
    side_multiple: int
    interpolation: str
    descriptor_dim: int
    weights_file: str  # the release file the entry loads (or, without a hub entry, the checkpoint to give)
    output_index: int = 0


# Each preset reads its repository's hubconf.py (entry, keyword arguments, the release file it fetches) and the
# input its authors evaluate with; all normalise with the ImageNet mean and std.
PRESETS: dict[str, Preset] = {
    # gmberton/CosPlace hubconf.py get_trained_model: releases/download/v1.0/{backbone}_{fc_output_dim}_cosplace.pth;
    # a ResNet takes any size: evaluated at the dataset's resolution.
    "cosplace": Preset(
        "gmberton/CosPlace",
        "get_trained_model",
        {"backbone": "ResNet50", "fc_output_dim": 2048},
        None,
        1,
        "bilinear",
        2048,
        "ResNet50_2048_cosplace.pth",
    ),
    # gmberton/EigenPlaces hubconf.py get_trained_model: releases/download/v1.0/{backbone}_{dim}_eigenplaces.pth.
    "eigenplaces": Preset(
        "gmberton/EigenPlaces",
        "get_trained_model",
        {"backbone": "ResNet50", "fc_output_dim": 2048},
        None,
        1,
        "bilinear",
        2048,
        "ResNet50_2048_eigenplaces.pth",
    ),
    # amaralibey/MixVPR has no hubconf.py: a clone with the few-line one of docs/retrievers.md, whose entry builds
    # main.py's VPRModel (ResNet-50 cropped after layer3, MixVPR 1024 channels x 4 rows); README: 320x320 input.
    "mixvpr": Preset(
        None,
        "mixvpr_resnet50",
        {},
        (320, 320),
        1,
        "bilinear",
        4096,
        "resnet50_MixVPR_4096_channels(1024)_rows(4).ckpt",
    ),
    # serizba/salad hubconf.py dinov2_salad: DINOv2 ViT-B/14 via torch.hub facebookresearch/dinov2, then
    # releases/download/v1.0.0/dino_salad.ckpt; evaluated at 322x322 (eval.py input_transform).
    "salad": Preset("serizba/salad", "dinov2_salad", {}, (322, 322), 14, "bilinear", 8448, "dino_salad.ckpt"),
    # amaralibey/Bag-of-Queries hubconf.py get_trained_boq: returns (descriptor, attentions); README: DINOv2 at
    # 322x322, ResNet-50 at 384x384, bicubic resize; releases/download/v1.0/{backbone_name}_{output_dim}.pth.
    "boq": Preset(
        "amaralibey/Bag-of-Queries",
        "get_trained_boq",
        {"backbone_name": "dinov2", "output_dim": 12288},
        (322, 322),
        14,
        "bicubic",
        12288,
        "dinov2_12288.pth",
    ),
    "boq_resnet50": Preset(
        "amaralibey/Bag-of-Queries",
        "get_trained_boq",
        {"backbone_name": "resnet50", "output_dim": 16384},
        (384, 384),
        1,
        "bicubic",
        16384,
        "resnet50_16384.pth",
    ),
    # gmberton/MegaLoc hubconf.py get_trained_model: releases/download/v1.0/megaloc.torch; its forward rounds any
    # size to multiples of 14 (megaloc_model.py MegaLocModel.forward), so the images keep their size.
    "megaloc": Preset("gmberton/MegaLoc", "get_trained_model", {}, None, 14, "bilinear", 8448, "megaloc.torch"),
    # Lu-Feng/CricaVPR hubconf.py trained_model: releases/download/v1.0/CricaVPR.pth ["model_state_dict"]; its
    # forward (network.py) splits a 16x16 patch grid, i.e. 224x224 input; 14 tokens x 768 = 10752.
    "cricavpr": Preset("Lu-Feng/CricaVPR", "trained_model", {}, (224, 224), 14, "bilinear", 10752, "CricaVPR.pth"),
}


# ----------------------------------------------------------------------------------------------------------------
# Naming a global model


def global_model_spec(
    model: str,
    kwargs: str | Mapping[str, Any] = "",
    weights: str | Path | None = None,
    image_size: Sequence[int] | None = None,
) -> GlobalModelSpec | None:
    """The spec that ``--global_model MODEL --global_model_kwargs KWARGS --global_weights FILE`` names; None for
    ``prgs`` (PRGS's own global descriptor).

    MODEL is one of: ``prgs``; a preset (``boq``); a preset served from a clone (``boq@path/to/Bag-of-Queries``);
    or ``SOURCE:ENTRY`` with SOURCE a folder holding a hubconf.py or a GitHub ``owner/repo[:ref]`` (a string of
    that form that is not an existing folder; write ``./owner/repo`` to mean a folder). The entry is the last
    ``:``-separated part. KWARGS: ``key=value,key=value`` (values read as Python literals when they parse, else as
    strings), added to and overriding a preset's. image_size (H, W) overrides the preset's input size.
    """
    model = model.strip()
    if model == OWN_MODEL:
        return None
    extra = dict(kwargs) if isinstance(kwargs, Mapping) else parse_kwargs(kwargs)
    preset_name, _, preset_source = model.partition("@")
    if preset_name in PRESETS:
        spec = _preset_spec(preset_name, preset_source or None, extra)
    elif ":" in model:
        source, entry = model.rsplit(":", 1)
        spec = GlobalModelSpec(name=model, source=source, source_kind=_source_kind(source), entry=entry, kwargs=extra)
    else:
        raise GlobalModelError(
            f"--global_model {model!r} is neither '{OWN_MODEL}', a preset ({', '.join(PRESETS)}), PRESET@FOLDER, "
            f"nor SOURCE:ENTRY (a folder with a hubconf.py or owner/repo, then the entry's name)"
        )
    if not ENTRY_NAME.match(spec.entry):
        raise GlobalModelError(f"--global_model {model!r}: the entry {spec.entry!r} is not a Python function name")
    if weights is not None:
        spec = replace(spec, weights=Path(weights).expanduser())
    if image_size is not None:
        spec = replace(spec, image_size=_checked_size(image_size, spec.side_multiple, model))
    return spec


def _preset_spec(name: str, source: str | None, extra: dict[str, Any]) -> GlobalModelSpec:
    """The spec of preset ``name``, from its GitHub repository or the folder ``source``."""
    preset = PRESETS[name]
    if source is None and preset.github is None:
        raise GlobalModelError(
            f"preset {name!r} has no hub entry upstream: give a clone holding the hubconf.py of docs/retrievers.md, "
            f"as --global_model {name}@FOLDER"
        )
    source = source or preset.github
    changed = any(preset.kwargs.get(key, object()) != value for key, value in extra.items())
    return GlobalModelSpec(
        name=name,
        source=source,
        source_kind=_source_kind(source),
        entry=preset.entry,
        kwargs={**preset.kwargs, **extra},
        image_size=preset.image_size,
        side_multiple=preset.side_multiple,
        interpolation=preset.interpolation,
        output_index=preset.output_index,
        descriptor_dim=None if changed else preset.descriptor_dim,  # other kwargs may change the dimension
    )


def _source_kind(source: str) -> str:
    """'local' for an existing folder or anything path-like, 'github' for owner/repo[:ref] that is not a folder."""
    if Path(source).expanduser().is_dir() or not GITHUB_REPO.match(source) or source.startswith("."):
        return "local"
    return "github"


def _checked_size(image_size: Sequence[int], side_multiple: int, model: str) -> tuple[int, int]:
    """(H, W) as positive ints, each a multiple of side_multiple, or GlobalModelError."""
    size = tuple(int(side) for side in image_size)
    if len(size) != 2 or min(size) <= 0:
        raise GlobalModelError(f"{model}: image size must be two positive sides H W, got {list(image_size)}")
    if any(side % side_multiple for side in size):
        raise GlobalModelError(
            f"{model}: image size {size[0]}x{size[1]} must have sides that are multiples of {side_multiple} "
            f"(DINOv2 patches), e.g. {_rounded(size[0], side_multiple)}x{_rounded(size[1], side_multiple)}"
        )
    return size  # type: ignore[return-value]


def parse_kwargs(text: str) -> dict[str, Any]:
    """``key=value,key=value`` -> dict. A value is a Python literal when it parses as one (512, False, 'x',
    [1, 2], {'a': 1}), else the string as written (ResNet50); commas inside brackets or quotes do not split."""
    kwargs: dict[str, Any] = {}
    for item in _split_top_level(text):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not ENTRY_NAME.match(key):
            raise GlobalModelError(f"--global_model_kwargs: expected key=value, got {item.strip()!r} in {text!r}")
        if key in kwargs:
            raise GlobalModelError(f"--global_model_kwargs: {key!r} is given twice in {text!r}")
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key] = value.strip()
    return kwargs


def _split_top_level(text: str) -> list[str]:
    """text split at the commas outside brackets and quotes; empty parts dropped."""
    parts, current, depth, quote = [], [], 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [part for part in parts if part.strip()]


def _rounded(side: int, multiple: int) -> int:
    """side rounded to the nearest multiple (at least one multiple)."""
    return max(multiple, round(side / multiple) * multiple)


# ----------------------------------------------------------------------------------------------------------------
# Loading: torch.hub, kept offline, with the project's own module names out of the way


def load_global_model(spec: GlobalModelSpec, device: torch.device | str = "cpu") -> nn.Module:
    """The model ``spec`` names: its hub entry called with its kwargs, weights from ``spec.weights`` (or the hub
    cache), in eval mode on ``device`` with gradients off. Every failure is a one-line GlobalModelError (a weights
    file that does not fit: CheckpointError naming the keys)."""
    if spec.source_kind == "local":
        _check_local_entry(spec)
    guard = _OfflineHub(spec)
    try:
        with _project_modules_hidden(), guard.active():
            model = torch.hub.load(
                spec.source, spec.entry, source=spec.source_kind, trust_repo=True, verbose=False, **spec.kwargs
            )
    except (GlobalModelError, CheckpointError):
        raise
    except Exception as error:
        raise GlobalModelError(f"{spec.name}: {_load_failure(spec, error)}") from error
    if not isinstance(model, nn.Module):
        raise GlobalModelError(
            f"{spec.name}: {spec.entry}() returned a {type(model).__name__}, expected a torch module"
        )
    if spec.weights is not None and not guard.weights_used:
        load_weights_strictly(model, spec.weights)
    return model.eval().requires_grad_(False).to(device)


def _load_failure(spec: GlobalModelSpec, error: Exception) -> str:
    """What went wrong while torch.hub loaded spec's entry, on one line."""
    if isinstance(error, RuntimeError) and "Cannot find callable" in str(error):
        return _no_entry(spec)
    if isinstance(error, TypeError) and "argument" in str(error):
        return f"{spec.entry}() does not take {spec.kwargs}: {_one_line(error)}"
    return f"loading {spec.entry} from {spec.source} failed: {_one_line(error)}"


def _one_line(error: BaseException) -> str:
    """The error's message on one line (its lines joined by ' / ')."""
    return " / ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


def _check_local_entry(spec: GlobalModelSpec) -> None:
    """GlobalModelError when the folder or its hubconf.py is missing."""
    folder = Path(spec.source).expanduser()
    if not folder.is_dir():
        raise GlobalModelError(f"{spec.name}: global model folder {folder} does not exist")
    if not (folder / "hubconf.py").is_file():
        raise GlobalModelError(
            f"{spec.name}: {folder} has no hubconf.py (a torch.hub folder defines its entries there)"
        )


def _no_entry(spec: GlobalModelSpec) -> str:
    """'<hubconf> has no entry <entry>', with the functions a local hubconf.py defines (read without importing)."""
    if spec.source_kind != "local":
        return f"the hubconf.py of {spec.source} has no entry {spec.entry!r}"
    hubconf = Path(spec.source).expanduser() / "hubconf.py"
    tree = ast.parse(hubconf.read_text(encoding="utf-8"), filename=str(hubconf))
    functions = [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")]
    return f"{hubconf} has no entry {spec.entry!r}; the functions it defines: {', '.join(functions) or 'none'}"


def load_weights_strictly(model: nn.Module, path: Path) -> None:
    """Load the state dict in ``path`` (a plain one, or under 'state_dict' / 'model_state_dict' / 'model') into
    ``model``: every key must fit; a 'module.' prefix (DataParallel) is dropped when the model has none."""
    weights = read_state_dict_file(path)
    target = model.state_dict()
    if weights and all(k.startswith("module.") for k in weights) and not any(k.startswith("module.") for k in target):
        weights = {k.removeprefix("module."): v for k, v in weights.items()}
    check_state_dict_compatible(target, weights, source=f"global model weights {path}")
    model.load_state_dict(weights)


@contextlib.contextmanager
def _project_modules_hidden() -> Iterator[None]:
    """Hub code imports its own top-level modules (CosPlace: ``from model import network``) and would get this
    project's namesakes from sys.modules; hide ours while it loads, then put them back."""
    names = {path.stem for path in PROJECT_ROOT.glob("*.py")}
    names |= {path.parent.name for path in PROJECT_ROOT.glob("*/__init__.py")}
    ours = {name: module for name, module in sys.modules.items() if name.split(".")[0] in names}
    for name in ours:
        del sys.modules[name]
    try:
        yield
    finally:
        for name in [name for name in sys.modules if name.split(".")[0] in names]:
            del sys.modules[name]
        sys.modules.update(ours)


class _OfflineHub:
    """While active: weight URLs the entry asks for are answered from the spec's weights file (same file name) or
    torch's hub cache, and any other download is refused with a message saying what to get and where to put it;
    a nested torch.hub.load from GitHub uses the hub cache's copy (a local spec never touches the network)."""

    def __init__(self, spec: GlobalModelSpec):
        self.spec = spec
        self.weights_used = False
        self._load_state_dict_from_url = torch.hub.load_state_dict_from_url
        self._download_url_to_file = torch.hub.download_url_to_file
        self._hub_load = torch.hub.load

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        with (
            mock.patch.object(torch.hub, "load_state_dict_from_url", self.load_state_dict_from_url),
            mock.patch.object(torch.hub, "download_url_to_file", self.download_url_to_file),
            mock.patch.object(torch.hub, "load", self.hub_load),
        ):
            yield

    def load_state_dict_from_url(self, url: str, *args, map_location=None, **kwargs) -> Any:
        weights = self.spec.weights
        if weights is not None and weights.name == Path(url.split("?")[0]).name:
            if not weights.is_file():
                raise GlobalModelError(f"{self.spec.name}: weights file {weights} does not exist")
            self.weights_used = True
            logger.info("%s: %s answered from %s", self.spec.name, url, weights)
            return torch.load(weights, map_location=map_location, weights_only=True)
        name = kwargs.get("file_name") or Path(url.split("?")[0]).name
        if not (Path(torch.hub.get_dir()) / "checkpoints" / name).is_file():
            raise self.refusal(url)
        return self._load_state_dict_from_url(url, *args, map_location=map_location, **kwargs)

    def download_url_to_file(self, url: str, destination: str, *args, **kwargs) -> None:
        if self.spec.source_kind == "github" and "/zipball/" in url:  # the repository's code the user named
            self._download_url_to_file(url, destination, *args, **kwargs)
            return
        raise self.refusal(url)  # e.g. torchvision's ImageNet weights, fetched through its own import of torch.hub

    def refusal(self, url: str) -> GlobalModelError:
        name = Path(url.split("?")[0]).name
        return GlobalModelError(
            f"{self.spec.name} asks for {url}; nothing is downloaded at run time: get that file and give it with "
            f"--global_weights (named {name}) or put it at {Path(torch.hub.get_dir()) / 'checkpoints' / name}"
        )

    def hub_load(self, repo_or_dir: str, model: str, *args, source: str = "github", **kwargs) -> Any:
        if source != "github" or self.spec.source_kind == "github":
            return self._hub_load(repo_or_dir, model, *args, source=source, **kwargs)
        owner_repo, _, ref = repo_or_dir.partition(":")
        hub_dir = Path(torch.hub.get_dir())
        for candidate in [ref] if ref else ["main", "master"]:
            cached = hub_dir / f"{owner_repo.replace('/', '_')}_{candidate.replace('/', '_')}"
            if (cached / "hubconf.py").is_file():
                return self._hub_load(str(cached), model, *args, source="local", **kwargs)
        raise GlobalModelError(
            f"{self.spec.name} loads {repo_or_dir}:{model} from GitHub; nothing is downloaded at run time: clone "
            f"{owner_repo} to {hub_dir / (owner_repo.replace('/', '_') + '_main')}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Describing images


class GlobalRetriever:
    """A loaded global model with its own preprocessing: ``describe`` maps a batch of pixels to (B, D) unit
    descriptors, batch by batch, for the extraction stage's image loop."""

    def __init__(self, model: nn.Module, spec: GlobalModelSpec, device: torch.device, precision: str = "fp32"):
        if spec.interpolation not in INTERPOLATIONS:
            raise GlobalModelError(
                f"{spec.name}: interpolation must be one of {INTERPOLATIONS}, got {spec.interpolation}"
            )
        self.model, self.spec, self.device, self.precision = model, spec, torch.device(device), precision
        self.mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def from_spec(cls, spec: GlobalModelSpec, device: torch.device | str, precision: str = "fp32") -> GlobalRetriever:
        """Load ``spec``'s model (load_global_model) and wrap it; logs what was loaded."""
        logger.info(spec.describe())
        return cls(load_global_model(spec, device), spec, torch.device(device), precision)

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) the model is fed for images of height x width: the spec's size, else theirs, each side
        rounded to the nearest multiple of spec.side_multiple."""
        height, width = self.spec.image_size or (height, width)
        return _rounded(height, self.spec.side_multiple), _rounded(width, self.spec.side_multiple)

    @torch.inference_mode()
    def describe(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W): uint8 in [0, 255] or float in [0, 1], not yet normalised -> (B, D) float32 unit
        descriptors on self.device."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise GlobalModelError(f"{self.spec.name}: expected images (B, 3, H, W), got {tuple(images.shape)}")
        pixels = images.to(self.device)
        if pixels.is_floating_point():
            low, high = float(pixels.min()), float(pixels.max())
            if low < -1e-3 or high > 1 + 1e-3:
                raise GlobalModelError(
                    f"{self.spec.name}: float images must be pixels in [0, 1] (the retriever normalises them "
                    f"itself), got values in [{low:.3f}, {high:.3f}]"
                )
            pixels = pixels.float()
        else:
            pixels = pixels.float().div(255)
        size = self.input_size(*pixels.shape[-2:])
        if tuple(pixels.shape[-2:]) != size:
            pixels = F.interpolate(pixels, size=size, mode=self.spec.interpolation, antialias=True, align_corners=False)
        pixels = (pixels - self.mean) / self.std  # (B, 3, H', W')
        with autocast(self.device, self.precision):
            output = self.model(pixels)
        return F.normalize(self._descriptors(output, len(images)).float(), dim=1)

    def _descriptors(self, output: Any, batch: int) -> torch.Tensor:
        """The (B, D) descriptor tensor in the model's output, or GlobalModelError saying what came instead."""
        if isinstance(output, (tuple, list)):
            if len(output) <= self.spec.output_index:
                raise GlobalModelError(
                    f"{self.spec.name}: the model returned a {type(output).__name__} of {len(output)}, "
                    f"expected the descriptor at index {self.spec.output_index}"
                )
            output = output[self.spec.output_index]
        if not isinstance(output, torch.Tensor):
            raise GlobalModelError(f"{self.spec.name}: the model returned a {type(output).__name__}, expected a tensor")
        expected_dim = self.spec.descriptor_dim
        shape = tuple(output.shape)
        if output.ndim != 2 or shape[0] != batch or (expected_dim is not None and shape[1] != expected_dim):
            wanted = f"({batch}, {expected_dim if expected_dim is not None else 'D'})"
            raise GlobalModelError(
                f"{self.spec.name}: the model returned descriptors of shape {shape}, expected {wanted}"
            )
        if not torch.isfinite(output).all():
            raise GlobalModelError(f"{self.spec.name}: the model returned descriptors that are not finite")
        return output
