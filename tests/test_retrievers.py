"""Any global retriever in front of the reranker: models named by preset or SOURCE:ENTRY, loaded from a local hub
folder written here (never the network), with keyword arguments and local weights, describing batches of pixels
with their own size and normalisation; every failure one line that says what was expected."""

import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import model as project_model_package
from model.checkpoint import CheckpointError
from places.images import IMAGENET_MEAN, IMAGENET_STD
from retrievers import (
    PRESETS,
    GlobalModelError,
    GlobalRetriever,
    global_model_spec,
    load_global_model,
    parse_kwargs,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RELEASE_URL = "https://example.invalid/releases/download/v1.0/tiny_release.pth"

HUBCONF = f'''
dependencies = ["torch"]

import torch

from model import tiny  # a package named like this project's model/, as CosPlace's hubconf imports "model.network"


def tiny_net(dim=8, scale=1.0):
    return tiny.TinyNet(dim, scale)


def tuple_net(dim=8):
    return tiny.TupleNet(dim)


def with_release_weights(dim=8):
    net = tiny.TinyNet(dim, 1.0)
    net.load_state_dict(torch.hub.load_state_dict_from_url("{RELEASE_URL}", map_location="cpu"))
    return net


def nested():
    return torch.hub.load("someone/dino", "dino_tiny")


def flat_output():
    return tiny.FlatOutput()


def not_a_module():
    return "a string"


def broken():
    raise ValueError("first line\\nsecond line")
'''

TINY = """
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, dim, scale):
        super().__init__()
        self.proj = nn.Linear(3, dim)
        self.scale = scale
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return self.proj(x.mean(dim=(2, 3))) * self.scale  # (B, dim)


class TupleNet(TinyNet):
    def __init__(self, dim):
        super().__init__(dim, 1.0)

    def forward(self, x):
        return super().forward(x), torch.zeros(len(x), 4, 4)  # (descriptor, attentions), as BoQ


class FlatOutput(TinyNet):
    def __init__(self):
        super().__init__(8, 1.0)

    def forward(self, x):
        return super().forward(x)[:, :, None, None]  # (B, D, 1, 1): not a descriptor matrix
"""


@pytest.fixture
def hub_folder(tmp_path, monkeypatch) -> Path:
    """A local torch.hub folder (hubconf.py + its own 'model' package), with torch's hub cache in tmp_path."""
    folder = tmp_path / "tiny_hub"
    (folder / "model").mkdir(parents=True)
    (folder / "hubconf.py").write_text(HUBCONF)
    (folder / "model" / "__init__.py").write_text("")
    (folder / "model" / "tiny.py").write_text(TINY)
    hub_dir = tmp_path / "torch_hub"
    hub_dir.mkdir()
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(hub_dir))
    yield folder
    torch.hub.set_dir(previous)


def tiny_state(dim: int = 8, seed: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"proj.weight": torch.randn(dim, 3, generator=generator), "proj.bias": torch.randn(dim, generator=generator)}


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------------------------------------------
# Naming a model


def test_prgs_means_no_retriever_in_front():
    assert global_model_spec("prgs") is None


def test_a_preset_fills_entry_kwargs_input_size_and_tuple_output():
    spec = global_model_spec("boq")
    assert (spec.source, spec.source_kind, spec.entry) == ("amaralibey/Bag-of-Queries", "github", "get_trained_boq")
    assert spec.kwargs == {"backbone_name": "dinov2", "output_dim": 12288}
    assert (spec.image_size, spec.side_multiple, spec.interpolation) == ((322, 322), 14, "bicubic")
    assert (spec.output_index, spec.descriptor_dim) == (0, 12288)
    assert (spec.mean, spec.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_a_preset_from_a_clone_is_local_and_changed_kwargs_drop_the_known_dimension(hub_folder):
    spec = global_model_spec(f"cosplace@{hub_folder}", "fc_output_dim=512", weights="w/ResNet50_512_cosplace.pth")
    assert (spec.source, spec.source_kind) == (str(hub_folder), "local")
    assert spec.kwargs == {"backbone": "ResNet50", "fc_output_dim": 512} and spec.descriptor_dim is None
    assert spec.weights == Path("w/ResNet50_512_cosplace.pth")
    assert global_model_spec("cosplace", "backbone=ResNet50").descriptor_dim == 2048  # same value: still known


@pytest.mark.parametrize(
    "text, source, kind, entry",
    [
        ("gmberton/MegaLoc:get_trained_model", "gmberton/MegaLoc", "github", "get_trained_model"),
        ("owner/repo:v1.0:entry", "owner/repo:v1.0", "github", "entry"),  # torch.hub's owner/repo:ref
        ("./owner/repo:entry", "./owner/repo", "local", "entry"),
        ("/abs/path/to/hub:entry", "/abs/path/to/hub", "local", "entry"),
        ("relative/deeper/folder:entry", "relative/deeper/folder", "local", "entry"),
    ],
)
def test_source_and_entry_split_at_the_last_colon(text, source, kind, entry):
    spec = global_model_spec(text)
    assert (spec.source, spec.source_kind, spec.entry, spec.name) == (source, kind, entry, text)


def test_an_existing_folder_of_the_form_owner_repo_is_local(hub_folder, monkeypatch):
    monkeypatch.chdir(hub_folder.parent)
    assert global_model_spec("tiny_hub/model:tiny_net").source_kind == "local"  # it exists: never GitHub


def test_keyword_arguments_are_literals_when_they_parse_else_strings():
    kwargs = parse_kwargs("backbone=ResNet50, fc_output_dim=512,pretrained=False,agg={'a': 1, 'b': [2, 3]}")
    assert kwargs == {"backbone": "ResNet50", "fc_output_dim": 512, "pretrained": False, "agg": {"a": 1, "b": [2, 3]}}
    assert parse_kwargs("") == {} and parse_kwargs("path=/a/b.pth") == {"path": "/a/b.pth"}
    assert parse_kwargs("s='x,y'") == {"s": "x,y"}


@pytest.mark.parametrize(
    "model, kwargs, size, message",
    [
        ("bogus", "", None, "is neither 'prgs', a preset"),
        ("folder:not-a-name", "", None, "the entry 'not-a-name' is not a Python function name"),
        ("mixvpr", "", None, "preset 'mixvpr' has no hub entry upstream"),
        ("salad", "", (320, 320), r"image size 320x320 must have sides that are multiples of 14 .* e\.g\. 322x322"),
        ("salad", "", (0, 14), "image size must be two positive sides"),
        ("boq", "output_dim", None, "expected key=value, got 'output_dim'"),
        ("boq", "a=1,a=2", None, "'a' is given twice"),
    ],
)
def test_a_model_that_cannot_be_named_is_one_line_saying_what_was_expected(model, kwargs, size, message):
    with pytest.raises(GlobalModelError, match=message) as error:
        global_model_spec(model, kwargs, image_size=size)
    one_line(error)


def test_every_preset_is_consistent_and_documented():
    table = (REPO_ROOT / "docs" / "retrievers.md").read_text().split("### Presets", 1)[1]
    for name, preset in PRESETS.items():
        if preset.image_size is not None:
            assert all(side % preset.side_multiple == 0 for side in preset.image_size), name
        assert preset.interpolation in ("bilinear", "bicubic")
        row = next((line for line in table.splitlines() if line.startswith(f"| `{name}` ")), None)
        assert row is not None, f"docs/retrievers.md has no table row for preset {name}"
        for fact in (preset.entry, str(preset.descriptor_dim), preset.weights_file, preset.github or "none"):
            assert fact in row, f"docs/retrievers.md's row of {name} does not say {fact}"


# ----------------------------------------------------------------------------------------------------------------
# Loading from a local hub folder


def test_a_local_entry_loads_with_its_kwargs_and_leaves_this_projects_modules_in_place(hub_folder):
    spec = global_model_spec(f"{hub_folder}:tiny_net", "dim=6,scale=2.0")
    model = load_global_model(spec)
    assert type(model).__name__ == "TinyNet" and model.proj.out_features == 6 and model.scale == 2.0
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert sys.modules["model"] is project_model_package  # the hub's own 'model' package did not replace ours
    assert "model.tiny" not in sys.modules


def test_a_local_weights_file_is_loaded_strictly(hub_folder, tmp_path):
    state = tiny_state()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "mine.pth")
    model = load_global_model(global_model_spec(f"{hub_folder}:tiny_net", weights=tmp_path / "mine.pth"))
    assert torch.equal(model.proj.weight, state["proj.weight"]) and torch.equal(model.proj.bias, state["proj.bias"])
    torch.save({"proj.weight": torch.zeros(4, 3), "other": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): proj\.bias") as error:
        load_global_model(global_model_spec(f"{hub_folder}:tiny_net", weights=tmp_path / "wrong.pth"))
    assert "1 unexpected key(s): other" in str(error.value)
    assert "proj.weight: file (4, 3), model (8, 3)" in str(error.value)


def test_the_entrys_weight_url_is_answered_by_the_file_of_the_same_name_never_downloaded(hub_folder, tmp_path):
    state = tiny_state(seed=5)
    (tmp_path / "given").mkdir()
    torch.save(state, tmp_path / "given" / "tiny_release.pth")
    spec = global_model_spec(f"{hub_folder}:with_release_weights", weights=tmp_path / "given" / "tiny_release.pth")
    assert torch.equal(load_global_model(spec).proj.weight, state["proj.weight"])

    with pytest.raises(GlobalModelError) as error:
        load_global_model(global_model_spec(f"{hub_folder}:with_release_weights"))
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    assert re.search(r"asks for .*tiny_release\.pth; nothing is downloaded at run time", one_line(error))
    assert f"--global_weights (named tiny_release.pth) or put it at {checkpoints / 'tiny_release.pth'}" in str(
        error.value
    )
    checkpoints.mkdir(exist_ok=True)  # torch's own hub cache answers too
    torch.save(state, checkpoints / "tiny_release.pth")
    assert torch.equal(
        load_global_model(global_model_spec(f"{hub_folder}:with_release_weights")).proj.bias, state["proj.bias"]
    )


def test_a_nested_github_load_uses_the_hub_cache_copy_or_says_where_to_clone(hub_folder):
    with pytest.raises(GlobalModelError, match=r"loads someone/dino:dino_tiny from GitHub; .* clone someone/dino to"):
        load_global_model(global_model_spec(f"{hub_folder}:nested"))
    cached = Path(torch.hub.get_dir()) / "someone_dino_main"
    cached.mkdir()
    (cached / "hubconf.py").write_text("import torch\n\ndef dino_tiny():\n    return torch.nn.Linear(3, 5)\n")
    assert isinstance(load_global_model(global_model_spec(f"{hub_folder}:nested")), torch.nn.Linear)


@pytest.mark.parametrize(
    "make_spec, message",
    [
        (lambda folder: f"{folder.parent / 'nowhere'}:tiny_net", "global model folder .*nowhere does not exist"),
        (lambda folder: f"{folder / 'model'}:tiny_net", "has no hubconf.py"),
        (lambda folder: f"{folder}:tiny", r"has no entry 'tiny'; the functions it defines: tiny_net, tuple_net"),
        (lambda folder: f"{folder}:not_a_module", r"not_a_module\(\) returned a str, expected a torch module"),
        (lambda folder: f"{folder}:broken", r"loading broken from .*tiny_hub failed: first line / second line"),
    ],
    ids=["missing folder", "missing hubconf", "unknown entry", "not a module", "entry fails"],
)
def test_a_model_that_cannot_be_loaded_is_one_line(hub_folder, make_spec, message):
    with pytest.raises(GlobalModelError, match=message) as error:
        load_global_model(global_model_spec(make_spec(hub_folder)))
    one_line(error)


def test_bad_keyword_arguments_name_the_entry_and_the_arguments(hub_folder):
    with pytest.raises(GlobalModelError, match=r"tiny_net\(\) does not take \{'width': 3\}: .*'width'") as error:
        load_global_model(global_model_spec(f"{hub_folder}:tiny_net", "width=3"))
    one_line(error)


# ----------------------------------------------------------------------------------------------------------------
# Describing images


def retriever(hub_folder, entry: str, **spec_changes) -> GlobalRetriever:
    spec = replace(global_model_spec(f"{hub_folder}:{entry}"), **spec_changes)
    return GlobalRetriever.from_spec(spec, "cpu")


def test_describe_resizes_normalises_and_returns_unit_float32_rows(hub_folder):
    model_retriever = retriever(hub_folder, "tiny_net", image_size=(28, 42), side_multiple=14)
    images = torch.randint(0, 256, (3, 3, 30, 40), dtype=torch.uint8)
    descriptors = model_retriever.describe(images)
    assert descriptors.shape == (3, 8) and descriptors.dtype == torch.float32
    assert torch.allclose(descriptors.norm(dim=1), torch.ones(3), atol=1e-6)
    fed = model_retriever.model.inputs[-1]  # (3, 3, 28, 42), ImageNet-normalised
    assert fed.shape == (3, 3, 28, 42)
    expected = torch.nn.functional.interpolate(images.float() / 255, size=(28, 42), mode="bilinear", antialias=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(fed, (expected - mean) / std, atol=1e-5)
    # float pixels in [0, 1] give the same descriptors as their uint8 originals
    assert torch.allclose(model_retriever.describe(images.float() / 255), descriptors, atol=1e-6)


def test_without_a_size_the_images_keep_theirs_rounded_to_the_patch_multiple(hub_folder):
    model_retriever = retriever(hub_folder, "tiny_net", side_multiple=14)
    model_retriever.describe(torch.rand(2, 3, 30, 45))
    assert model_retriever.model.inputs[-1].shape[-2:] == (28, 42)
    assert model_retriever.input_size(5, 100) == (14, 98)


def test_a_tuple_output_gives_its_descriptor_element(hub_folder):
    assert retriever(hub_folder, "tuple_net", descriptor_dim=8).describe(torch.rand(2, 3, 16, 16)).shape == (2, 8)


@pytest.mark.parametrize(
    "entry, changes, images, message",
    [
        ("flat_output", {}, torch.rand(2, 3, 8, 8), r"descriptors of shape \(2, 8, 1, 1\), expected \(2, D\)"),
        ("tiny_net", {"descriptor_dim": 16}, torch.rand(2, 3, 8, 8), r"shape \(2, 8\), expected \(2, 16\)"),
        ("tuple_net", {"output_index": 2}, torch.rand(2, 3, 8, 8), "returned a tuple of 2, expected the descriptor at"),
        ("tiny_net", {}, torch.randn(2, 3, 8, 8) * 3, r"float images must be pixels in \[0, 1\]"),
        ("tiny_net", {}, torch.rand(2, 1, 8, 8), r"expected images \(B, 3, H, W\), got \(2, 1, 8, 8\)"),
    ],
    ids=["not a matrix", "wrong dimension", "tuple too short", "already normalised", "not RGB"],
)
def test_an_output_or_input_of_the_wrong_shape_is_one_line(hub_folder, entry, changes, images, message):
    with pytest.raises(GlobalModelError, match=message) as error:
        retriever(hub_folder, entry, **changes).describe(images)
    one_line(error)
