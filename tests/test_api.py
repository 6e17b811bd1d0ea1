"""The Python API, torch.hub entry points and the cross-graph attention behind the reranking pictures."""

import os
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import api
import extraction
from config import EvalSettings
from datasets_ws import ImageDataset, SplitRequest, load_split
from model.checkpoint import build_model
from model.correspondences import cross_graph_attention, graph_attention, stage_node_boxes
from model.network import ModelConfig
from model.reranker import GraphReranker
from places.images import load_image

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (144, 192)


@pytest.fixture(scope="module")
def toy_test_split(small_toy_world):
    return load_split(SplitRequest(small_toy_world, "toy_world", "test"))


@pytest.fixture(scope="module")
def script_model(trained_toy_checkpoint):
    """The network test.py builds for --resume trained_toy_checkpoint."""
    model, _ = build_model(ModelConfig(), resume=trained_toy_checkpoint)
    return model.eval()


def _hub_load(entry: str, **kwargs):
    return torch.hub.load(str(REPO_ROOT), entry, source="local", **kwargs)


def test_hub_model_outputs_equal_the_scripts(trained_toy_checkpoint, script_model, toy_test_split, tmp_path):
    hub_model = _hub_load("prgs", weights=str(trained_toy_checkpoint))
    assert hub_model.image_size == IMAGE_SIZE and not hub_model.training
    hub_weights = hub_model.network.state_dict()
    assert all(torch.equal(hub_weights[k], v) for k, v in script_model.state_dict().items())
    settings = EvalSettings(
        image_size=IMAGE_SIZE, device=torch.device("cpu"), infer_batch_size=16, num_workers=0, rerank_top=10
    )
    descriptors, store, _ = extraction.extract_features(script_model, toy_test_split, settings, tmp_path / "store")
    store.close()
    paths = toy_test_split.absolute_paths()
    described = hub_model.describe(paths, batch_size=16)
    np.testing.assert_allclose(described.global_descriptors.numpy(), descriptors, atol=1e-5)
    with torch.no_grad():
        images = torch.stack([ImageDataset(toy_test_split, IMAGE_SIZE)[i][0] for i in range(16)])
        _, script_local = script_model(images)
    torch.testing.assert_close(described.local_features[:16], script_local, atol=1e-5, rtol=0)
    query = toy_test_split.database_num  # the first query
    candidates = torch.arange(10)
    with torch.no_grad():
        script_scores = script_model.rerank(
            described.local_features[query][None], described.local_features[candidates][None], grid=(9, 12)
        )[0]
    hub_scores = hub_model.rerank(described.local_features[query], described.local_features[candidates])
    torch.testing.assert_close(hub_scores, script_scores, atol=1e-6, rtol=0)
    assert torch.equal(hub_scores.argsort(), script_scores.argsort())


def test_hub_global_entry_gives_global_descriptors_only(trained_toy_checkpoint, toy_test_split):
    model = _hub_load("prgs_global", weights=str(trained_toy_checkpoint))
    full = _hub_load("prgs", weights=str(trained_toy_checkpoint))
    images = torch.stack([load_image(p, IMAGE_SIZE) for p in toy_test_split.absolute_paths()[:4]])
    with torch.no_grad():
        descriptors = model(images)
    assert descriptors.shape == (4, 256)
    torch.testing.assert_close(descriptors, full.describe(images).global_descriptors, atol=1e-6, rtol=0)
    assert model.describe(images).local_features is None
    with pytest.raises(ValueError, match="global-only"):
        model.rerank(torch.zeros(108, 35), torch.zeros(2, 108, 35))


def test_hub_list_and_help_read_the_entry_points(monkeypatch):
    """torch.hub.list/help take a GitHub repository; here they are pointed at this checkout instead of a download."""
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *args, **kwargs: str(REPO_ROOT))
    assert sorted(torch.hub.list("owner/prgs")) == ["prgs", "prgs_global"]
    assert "patch-to-region graph reranker" in torch.hub.help("owner/prgs", "prgs")
    assert "global descriptor alone" in torch.hub.help("owner/prgs", "prgs_global")


def test_hub_leaves_the_callers_modules_alone(trained_toy_checkpoint, monkeypatch):
    """The repository's generic top-level names (util, model, places, api...) must neither shadow nor be shadowed by
    the caller's modules of the same names."""
    callers_util = types.ModuleType("util")
    monkeypatch.setitem(sys.modules, "util", callers_util)
    project_api = sys.modules["api"]
    path_before = list(sys.path)
    model = _hub_load("prgs", weights=str(trained_toy_checkpoint))
    assert sys.modules["util"] is callers_util and sys.modules["api"] is project_api
    assert type(model).__module__ == "api" and type(model) is not api.PRGS  # the hub's own copy
    assert sys.path == path_before
    monkeypatch.delitem(sys.modules, "api")
    monkeypatch.delitem(sys.modules, "model.correspondences")
    _hub_load("prgs", weights=str(trained_toy_checkpoint))
    assert "api" not in sys.modules and "model.correspondences" not in sys.modules


def test_hub_downloads_only_a_url_it_is_given(trained_toy_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    model = _hub_load("prgs", weights=trained_toy_checkpoint.as_uri())  # a file:// URL stands in for https://
    assert (tmp_path / "hub" / "checkpoints" / trained_toy_checkpoint.name).is_file()
    assert model.image_size == IMAGE_SIZE
    with pytest.raises(Exception, match="checkpoint not found"):
        _hub_load("prgs", weights=str(tmp_path / "missing.pth"))


def test_readme_api_example_runs(small_toy_world, trained_toy_checkpoint, tmp_path, monkeypatch, capsys):
    """The README's Python example, executed as written from a folder that looks like the repository after
    `bash train_reranking.sh`."""
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) == 1, "the README should hold exactly one python example"
    run = tmp_path / "logs" / "toy_world_demo" / "2026-01-01_00-00-00" / "reranker"
    run.mkdir(parents=True)
    (run / "best.pth").symlink_to(trained_toy_checkpoint)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "toy_world").symlink_to(small_toy_world / "toy_world")
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert re.search(r"best match: @[\d.]+@[\d.]+@.*\.jpg", printed), printed


def test_api_accepts_pil_images_and_paths_alike(trained_toy_checkpoint, toy_test_split):
    from PIL import Image

    model = api.load_model(trained_toy_checkpoint)
    paths = toy_test_split.absolute_paths()[:3]
    with Image.open(paths[0]) as first:
        pil = [first.copy()] + list(paths[1:])
    torch.testing.assert_close(model.describe(pil).global_descriptors, model.describe(paths).global_descriptors)
    with pytest.raises(ValueError, match=r"expected query_local \(L, C\)"):
        model.rerank(torch.zeros(1, 108, 35), torch.zeros(2, 108, 35))


# ----------------------------------------------------------------------------------------------------------------
# Cross-graph attention


def _random_nodes(seed: int, group: int = 4, grid=(9, 12), channels: int = 35) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, group, grid[0] * grid[1], channels, generator=generator)


@pytest.mark.parametrize("grad", [False, True])
def test_captured_attention_is_what_each_cross_graph_used(grad):
    """A * h through the layer's own norm, GELU and gated residual reproduces the layer's output: the attention the
    hooks recompute is the one the reranker used (plain path, with and without autograd)."""
    reranker = GraphReranker(35, (9, 12)).eval()
    nodes = _random_nodes(0)
    inputs, outputs = {}, {}

    def record(stage):
        def hook(layer, layer_inputs, output):
            inputs[stage], outputs[stage] = layer_inputs[0], output

        return hook

    hooks = [layer.register_forward_hook(record(s)) for s, layer in enumerate(reranker.crossnode_graph_layers)]
    with torch.set_grad_enabled(grad):
        logits, captured = cross_graph_attention(reranker, nodes, (9, 12))
        for hook in hooks:
            hook.remove()
        torch.testing.assert_close(logits, reranker(nodes, (9, 12)), atol=0, rtol=0)
        for stage, layer in enumerate(reranker.crossnode_graph_layers):
            x = inputs[stage]
            attention = graph_attention(layer, x)  # (B, N, L, L)
            assert torch.equal(attention[:, 1:], captured[stage])
            alpha = layer.alpha.clamp(0.1, 0.9)
            rebuilt = (1 - alpha) * x + alpha * torch.nn.functional.gelu(layer.norm_layer(attention @ layer.linear(x)))
            torch.testing.assert_close(rebuilt, outputs[stage], atol=1e-5, rtol=1e-5)
    assert [captured[s].shape for s in range(3)] == [(2, 3, 108, 108), (2, 3, 30, 30), (2, 3, 37, 37)]
    torch.testing.assert_close(captured[1].sum(-1), torch.ones(2, 3, 30))
    assert not reranker.crossnode_graph_layers[0]._forward_hooks  # hooks removed


def test_stage_node_boxes_cover_the_pooled_patches():
    patches, regions, multi = stage_node_boxes((9, 12), 16)
    assert patches.shape == (108, 4) and regions.shape == (30, 4) and multi.shape == (37, 4)
    assert patches[13].tolist() == [16, 16, 32, 32]  # row 1, column 1
    assert regions[0].tolist() == [0, 0, 32, 32]  # 3x3 window at (-1, -1), clipped
    assert regions[7].tolist() == [16, 16, 64, 64]  # region row 1, column 1: patches 1..3
    assert torch.equal(multi[:30], regions)
    assert multi[30].tolist() == [0, 0, 64, 64]  # first 2x2 group: regions (0..1, 0..1)
    assert multi[-1].tolist() == [0, 0, 128, 128]  # the single 4x4 group: regions (0..3, 0..3)
    assert (multi[:, 2] <= 192).all() and (multi[:, 3] <= 144).all()


def test_api_correspondences_agree_with_rerank(trained_toy_checkpoint, toy_test_split):
    model = api.load_model(trained_toy_checkpoint)
    local = model.describe(toy_test_split.absolute_paths()[:5]).local_features
    probabilities, attention, boxes = model.correspondences(local[0], local[1:], stage=1)
    torch.testing.assert_close(probabilities, model.rerank(local[0], local[1:]), atol=0, rtol=0)
    assert attention.shape == (4, 30, 30) and boxes.shape == (30, 4)
    torch.testing.assert_close(attention.sum(-1), torch.ones(4, 30))


def test_hubconf_imports_only_the_api_of_the_project():
    text = (REPO_ROOT / "hubconf.py").read_text()
    imported = re.findall(r"^\s*(?:import|from) (\w+)", text, flags=re.MULTILINE)
    assert set(imported) <= {"contextlib", "sys", "pathlib", "urllib", "torch", "api"}, imported
    assert os.path.basename(api.__file__) == "api.py"
