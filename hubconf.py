"""torch.hub entry points (docs/api.md):

    model = torch.hub.load("path/to/this/repository", "prgs", weights="best.pth", source="local")
    model = torch.hub.load("path/to/this/repository", "prgs_global", weights="resume/msls_v2_deits.pth", source="local")

Both return an ``api.PRGS`` module: the network with its preprocessing (``model.preprocess``, ``model.describe``,
``model.rerank``). Nothing is downloaded unless ``weights`` is a URL.

torch.hub puts the repository on sys.path only while it imports this file, and this project's top-level modules have
generic names (``util``, ``model``, ``places``, ``api``...). So they are imported here under a guard: modules of the
same names that the caller had already imported stay in place, and ours are taken out of sys.modules again
afterwards. One consequence: ``torch.save(model)`` (pickling the whole module) fails; save ``model.state_dict()``.
"""

import contextlib as _contextlib
import sys as _sys
from pathlib import Path as _Path
from urllib.parse import urlparse as _urlparse

import torch as _torch

dependencies = ["torch", "torchvision", "timm", "numpy", "PIL", "tqdm"]

_REPOSITORY = _Path(__file__).resolve().parent
_URL_SCHEMES = ("http://", "https://", "file://")


@_contextlib.contextmanager
def _repository_modules():
    """Import this repository's top-level modules from it, then leave sys.modules as the caller had it."""
    names = {path.stem for path in _REPOSITORY.glob("*.py")} | {
        path.name for path in _REPOSITORY.iterdir() if (path / "__init__.py").is_file()
    }
    names.discard("hubconf")
    ours = lambda module: module.split(".")[0] in names
    callers = {module: _sys.modules.pop(module) for module in [m for m in _sys.modules if ours(m)]}
    _sys.path.insert(0, str(_REPOSITORY))
    try:
        yield
    finally:
        _sys.path.remove(str(_REPOSITORY))
        for module in [m for m in _sys.modules if ours(m)]:
            del _sys.modules[module]
        _sys.modules.update(callers)


with _repository_modules():
    import api


def _local_weights(weights):
    """A local path for weights: the path itself, or a URL's file downloaded once into torch.hub's cache."""
    if weights is None or not str(weights).startswith(_URL_SCHEMES):
        return weights
    name = _Path(_urlparse(str(weights)).path).name or "prgs_weights.pth"  # the file name, without ?query
    target = _Path(_torch.hub.get_dir()) / "checkpoints" / name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _torch.hub.download_url_to_file(str(weights), str(target), progress=True)
    return target


def prgs(weights=None, image_size=None, device="cpu", strict=True):
    """PRGS (global retrieval + patch-to-region graph reranker) with its preprocessing, as an api.PRGS module.

    weights: a checkpoint file of any layout test.py --resume takes (this project's, the reference's full PRGS
        checkpoint such as msls_train_prgs.pt, or its global-only DeiT checkpoint), or a URL (downloaded once into
        torch.hub's cache). None: an untrained reranker (the backbone from timm's/torchvision's local cache if there).
    image_size: (H, W) that model.preprocess resizes to; default the size the model was built for.
    device: where the module lives. strict: refuse a checkpoint with missing, unexpected or mis-shaped keys.

    model.describe(images) -> .global_descriptors (B, D), .local_features (B, L, C);
    model.rerank(query_local (L, C), candidates_local (K, L, C)) -> P(same place) (K,).
    """
    return api.load_model(_local_weights(weights), image_size=image_size, device=device, strict=strict)


def prgs_global(weights=None, image_size=None, device="cpu", strict=True):
    """The global descriptor alone (DeiT + projection), as an api.PRGS module whose forward and describe give only
    (B, D) global descriptors; weights as for ``prgs`` (e.g. R2Former's msls_v2_deits.pth, or any PRGS checkpoint)."""
    return api.load_model(
        _local_weights(weights), global_only=True, image_size=image_size, device=device, strict=strict
    )
