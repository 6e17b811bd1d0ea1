"""The reranker computes the reference's function (golden), at any grid, and refuses inputs that do not fit."""

import pytest
import torch

from model.bf16_attention import IMAGES_PER_BLOCK
from model.reranker import GraphReranker, match_probability, num_regions, stage_grids


def _load_golden_reranker(golden_dir):
    reranker = GraphReranker(node_dim=131, grid=(30, 40), temperature=0.5)
    reranker.load_state_dict(torch.load(golden_dir / "reranker_state_dict.pt", weights_only=True), strict=True)
    return reranker.eval()


def _run_with_intermediates(reranker: GraphReranker, nodes: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits and the outputs the golden file records: after each cross graph, the MLP and the last image graph."""
    captured = {}
    modules = {f"crossnode.{i}": reranker.crossnode_graph_layers[i] for i in range(3)}
    modules.update({"dim_reduce": reranker.dim_reduce, "imagegraph.2": reranker.image_graph_layers[2]})
    hooks = [
        module.register_forward_hook(lambda m, a, out, name=name: captured.__setitem__(name, out))
        for name, module in modules.items()
    ]
    with torch.no_grad():
        logits = reranker(nodes, grid=(30, 40))
    for hook in hooks:
        hook.remove()
    return logits, captured


def test_golden_logits_and_intermediates_in_float64(golden_dir):
    """Parity with the reference run in double precision: 1e-6 on any CPU (golden/README.md's tolerance)."""
    reranker = _load_golden_reranker(golden_dir).double()
    nodes = torch.load(golden_dir / "reranker_io.pt", weights_only=True)["x_rerank"].double()
    expected = torch.load(golden_dir / "reranker_io_f64.pt", weights_only=True)
    logits, captured = _run_with_intermediates(reranker, nodes)
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
    assert set(expected["intermediates"]) == set(captured)
    for name, value in expected["intermediates"].items():
        torch.testing.assert_close(captured[name], value, rtol=0, atol=1e-6, msg=name)


def test_golden_float32_logits_are_within_1e_3_of_the_float64_truth(golden_dir):
    """Float32 is good to about sqrt(machine epsilon) here (distances between identical masked nodes): the logits
    within 1e-3 of the float64 truth and the same candidate order. The intermediates are not compared in float32:
    the reference's own float32 run is 1.4e-3 away from float64 after the last cross graph."""
    reranker = _load_golden_reranker(golden_dir)
    nodes = torch.load(golden_dir / "reranker_io.pt", weights_only=True)["x_rerank"]
    expected = torch.load(golden_dir / "reranker_io_f64.pt", weights_only=True)["logits"]
    logits, _ = _run_with_intermediates(reranker, nodes)
    torch.testing.assert_close(logits.double(), expected, rtol=0, atol=1e-3)
    assert torch.equal(match_probability(logits).argsort(-1), match_probability(expected).argsort(-1))


def test_golden_parameter_count_and_keys(golden_dir):
    import json

    keys = json.loads((golden_dir / "reranker_keys.json").read_text())
    reranker = GraphReranker()
    ours = {k: list(v.shape) for k, v in reranker.state_dict().items()}
    assert ours == keys
    assert sum(p.numel() for p in reranker.parameters()) == 570_922


@pytest.mark.parametrize("grid", [(30, 40), (40, 30), (14, 14), (20, 20), (7, 7), (12, 16)])
def test_region_count_matches_the_general_formula(grid):
    h, w = grid
    h1, w1 = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    expected = h1 * w1 + ((h1 - 2) // 2 + 1) * ((w1 - 2) // 2 + 1) + ((h1 - 4) // 4 + 1) * ((w1 - 4) // 4 + 1)
    assert num_regions(grid) == expected


def test_stage_sizes_at_480x640():
    grids = stage_grids((30, 40))
    assert grids == {"patch": (30, 40), "region": (15, 20), "region_2x2": (7, 10), "region_4x4": (3, 5)}
    assert num_regions((30, 40)) == 385


def test_reranker_node_counts_per_stage():
    reranker = GraphReranker(node_dim=11, grid=(30, 40)).eval()
    lengths = []
    hooks = [
        layer.register_forward_hook(lambda m, a, out: lengths.append(out.shape[2]))
        for layer in reranker.crossnode_graph_layers
    ]
    with torch.no_grad():
        reranker(torch.randn(1, 3, 1200, 11), grid=(30, 40))
    for hook in hooks:
        hook.remove()
    assert lengths == [1200, 300, 385]


@pytest.mark.parametrize("grid", [(30, 40), (40, 30), (14, 14), (20, 20)])
def test_runs_on_any_grid(grid):
    h, w = grid
    reranker = GraphReranker(node_dim=19, grid=grid).eval()
    nodes = torch.randn(2, 1 + 3, h * w, 19)
    nodes[:, :, : h * w // 6] = 0  # zeroed (masked) nodes, as the local features have
    with torch.no_grad():
        logits = reranker(nodes, grid=grid)
    assert logits.shape == (2, 3, 2)
    assert torch.isfinite(logits).all()


def test_portrait_grid_is_read_as_portrait():
    """A 40x30 input must be pooled on its own grid: transposing the image transposes the regions, so the
    result equals the landscape result of the transposed nodes only when the reshape respects the grid."""
    torch.manual_seed(1)
    reranker = GraphReranker(node_dim=7, grid=(30, 40)).eval()
    assert num_regions((40, 30)) == reranker.num_regions == 385
    portrait = torch.randn(1, 3, 40 * 30, 7)
    with torch.no_grad():
        as_portrait = reranker(portrait, grid=(40, 30))
        as_landscape = reranker(portrait, grid=(30, 40))
    assert as_portrait.shape == (1, 2, 2) and torch.isfinite(as_portrait).all()
    assert not torch.allclose(as_portrait, as_landscape)


def test_refuses_a_node_count_that_does_not_fit_the_grid():
    reranker = GraphReranker(node_dim=7, grid=(30, 40))
    with pytest.raises(ValueError, match=r"1000 nodes per image but the grid 30x40 has 1200"):
        reranker(torch.randn(1, 2, 1000, 7), grid=(30, 40))


def test_refuses_a_grid_with_another_region_count():
    reranker = GraphReranker(node_dim=7, grid=(30, 40))
    with pytest.raises(ValueError, match=r"grid 20x20 gives 129 region nodes.*built for grid 30x40 \(385 regions\)"):
        reranker(torch.randn(1, 2, 400, 7), grid=(20, 20))


def test_refuses_wrong_channels_and_tiny_grids():
    reranker = GraphReranker(node_dim=7, grid=(14, 14))
    with pytest.raises(ValueError, match="channels"):
        reranker(torch.randn(1, 2, 196, 9), grid=(14, 14))
    with pytest.raises(ValueError, match="too small"):
        GraphReranker(node_dim=7, grid=(6, 20))


def test_candidate_scores_depend_on_the_group():
    """The image-level graph makes a candidate's score depend on the other candidates, as in the reference."""
    torch.manual_seed(2)
    reranker = GraphReranker(node_dim=7, grid=(14, 14)).eval()
    nodes = torch.randn(1, 4, 196, 7)
    changed = nodes.clone()
    changed[:, 3] = torch.randn(196, 7)
    with torch.no_grad():
        before, after = reranker(nodes, (14, 14)), reranker(changed, (14, 14))
    assert not torch.allclose(before[:, 0], after[:, 0])


def test_inference_path_equals_the_autograd_path_bit_for_bit():
    """Under no_grad the graphs divide and add the diagonal in place; for a group of one block (5 images) the
    values must not change at all."""
    torch.manual_seed(4)
    reranker = GraphReranker(node_dim=11, grid=(12, 16)).eval()
    nodes = torch.randn(2, 5, 192, 11)
    nodes[:, :, :30] = 0.0
    with torch.no_grad():
        inference = reranker(nodes, (12, 16))
    training = reranker(nodes, (12, 16))
    assert training.requires_grad
    assert torch.equal(inference, training.detach())


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_inference_in_blocks_of_images_equals_the_whole_group(dtype, atol):
    """A group larger than IMAGES_PER_BLOCK runs its node graphs a block of images at a time under no_grad: the same
    function as the whole group at once (autograd path), up to the rounding of batched products."""
    torch.manual_seed(5)
    reranker = GraphReranker(node_dim=11, grid=(12, 16)).eval().to(dtype)
    group = 2 * IMAGES_PER_BLOCK + 3  # two full blocks and a partial one
    nodes = torch.randn(2, group, 192, 11, dtype=dtype)
    nodes[:, :, :30] = 0.0
    with torch.no_grad():
        blocked = reranker(nodes, (12, 16))
    whole = reranker(nodes, (12, 16)).detach()
    assert blocked.shape == (2, group - 1, 2)
    torch.testing.assert_close(blocked, whole, rtol=0, atol=atol)
