"""Backbones and local features: golden parity with the reference, any resolution, CNN option."""

import pytest
import torch

from model.backbone import (
    DeiTBackbone,
    ResNetBackbone,
    build_backbone,
    fit_pos_embed,
    last_block_with_prefix_attention,
    patch_grid,
)
from model.checkpoint import load_imagenet_weights
from model.local_features import build_nodes, kept_node_mask, node_coordinates
from model.network import ModelConfig, PRGSNetwork, standardize_images


def _golden_small_network(golden_dir):
    io = torch.load(golden_dir / "small_backbone_io.pt", weights_only=True)
    config = io["config"]
    backbone = DeiTBackbone(
        tuple(config["img_size"]),
        config["embed_dim"],
        config["depth"],
        config["num_heads"],
        out_dim=config["fc_output_dim"],
        patch_size=config["patch_size"],
    )
    network = PRGSNetwork(
        ModelConfig(
            image_size=tuple(config["img_size"]),
            fc_output_dim=config["fc_output_dim"],
            local_dim=config["local_dim"],
            num_kept_nodes=config["num_local_nomask"],
        ),
        backbone=backbone,
    )
    state = torch.load(golden_dir / "small_backbone_state_dict.pt", weights_only=True)
    result = network.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith("reranker.") for k in result.missing_keys)
    return network.eval(), io


def test_golden_global_and_local_features(golden_dir):
    network, io = _golden_small_network(golden_dir)
    with torch.no_grad():
        global_descriptor, local = network(io["images"])
    torch.testing.assert_close(global_descriptor, io["global"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(local, io["local"], rtol=1e-4, atol=1e-4)
    zeroed, zeroed_golden = local.abs().sum(-1) == 0, io["local"].abs().sum(-1) == 0
    assert torch.equal(zeroed, zeroed_golden)
    assert zeroed.sum(1).tolist() == [200, 200]


def test_global_only_mode_matches_full_forward(golden_dir):
    network, io = _golden_small_network(golden_dir)
    with torch.no_grad():
        global_only = network(io["images"], global_only=True)
    torch.testing.assert_close(global_only, io["global"], rtol=1e-4, atol=1e-4)


def test_last_block_runs_once_and_equals_timm_block():
    torch.manual_seed(0)
    backbone = DeiTBackbone((64, 96), embed_dim=48, depth=2, num_heads=3).eval()
    x = torch.randn(2, 2 + 24, 48)
    block = backbone.blocks[-1]
    with torch.no_grad():
        ours, attention = last_block_with_prefix_attention(block, x)
        theirs = block(x)
        # the reference's map: explicit softmax over the whole attention matrix, rows of cls and dist
        qkv = block.attn.qkv(block.norm1(x)).reshape(2, 26, 3, 3, 16).permute(2, 0, 3, 1, 4)
        full = ((qkv[0] * block.attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)  # (B, heads, N, N)
        expected = full[:, :, :2, 2:].sum(dim=(1, 2))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention, expected, rtol=1e-5, atol=1e-6)


def test_image_size_must_be_divisible_by_the_patch():
    with pytest.raises(ValueError, match=r"image size 470x640"):
        patch_grid((470, 640))
    backbone = DeiTBackbone((64, 64), embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match=r"image size 64x70"):
        backbone.forward_prgs(torch.randn(1, 3, 64, 70))


def test_positional_embedding_unchanged_at_the_built_size_and_cropped_inside():
    backbone = DeiTBackbone((480, 640), embed_dim=8, depth=1, num_heads=2)
    assert torch.equal(backbone.positional_embedding((30, 40)), backbone.pos_embed)
    grid = backbone.pos_embed[:, 2:].reshape(30, 40, 8)
    crop = backbone.positional_embedding((14, 14))[0, 2:].reshape(14, 14, 8)
    assert torch.equal(crop, grid[8:22, 13:27])  # 224x224: rows 8-21, cols 13-26 (as the reference)
    square = backbone.positional_embedding((30, 30))[0, 2:].reshape(30, 30, 8)
    assert torch.equal(square, grid[:, 5:35])  # 480x480: rows 0-29, cols 5-34
    portrait = backbone.positional_embedding((40, 30))
    assert portrait.shape == (1, 2 + 1200, 8) and torch.equal(portrait[:, :2], backbone.pos_embed[:, :2])


def test_fit_pos_embed_enlarges_isotropically():
    patch_pos = torch.randn(1, 4 * 4, 3)
    enlarged = fit_pos_embed(patch_pos, (4, 4), (8, 6))
    assert enlarged.shape == (1, 48, 3) and torch.isfinite(enlarged).all()


@pytest.mark.parametrize("size", [(64, 96), (96, 64), (112, 112)])
def test_deit_runs_at_other_sizes(size):
    backbone = DeiTBackbone((64, 96), embed_dim=32, depth=2, num_heads=2, out_dim=16).eval()
    with torch.no_grad():
        out = backbone.forward_prgs(torch.randn(2, 3, *size))
    h, w = size[0] // 16, size[1] // 16
    assert out.grid == (h, w)
    assert out.tokens.shape == (2, h * w, 32) and out.attention.shape == (2, h * w)
    torch.testing.assert_close(out.global_descriptor.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_resnet_backbones_read_their_channel_counts(arch):
    backbone = ResNetBackbone(arch, image_size=(128, 160), out_dim=32).eval()
    expected_channels = 256 if arch in ("resnet18", "resnet34") else 1024
    assert backbone.token_dim == expected_channels
    with torch.no_grad():
        out = backbone.forward_prgs(torch.randn(2, 3, 128, 160))
    assert out.grid == (8, 10)
    assert out.tokens.shape == (2, 80, expected_channels)
    assert out.attention.shape == (2, 80) and torch.isfinite(out.attention).all()
    torch.testing.assert_close(out.global_descriptor.norm(dim=1), torch.ones(2))


def test_cnn_network_end_to_end():
    network = PRGSNetwork(ModelConfig(backbone="resnet18", image_size=(128, 128), local_dim=16)).eval()
    with torch.no_grad():
        global_descriptor, local = network(torch.randn(3, 3, 128, 128))
        probabilities = network.rerank(local[:1], local[1:].unsqueeze(0))
    assert global_descriptor.shape == (3, 256) and local.shape == (3, 64, 19)
    assert ((local.abs().sum(-1) == 0).sum(1) == 64 - 64 * 5 // 6).all()
    assert probabilities.shape == (1, 2) and ((probabilities >= 0) & (probabilities <= 1)).all()


def test_node_coordinates_follow_the_reference_formula():
    xy = node_coordinates((30, 40), 16, (480, 640))
    assert xy.shape == (1200, 2)
    p = torch.arange(1200)
    torch.testing.assert_close(xy[:, 0], ((p % 40) * 16 + 8) / 640.0)
    torch.testing.assert_close(xy[:, 1], ((p // 40) * 16 + 8) / 640.0)
    assert xy[:, 0].min() == 0.0125 and xy[:, 1].max() == pytest.approx(0.7375)


def test_build_nodes_zeroes_the_least_attended_rows_in_grid_order():
    torch.manual_seed(0)
    descriptors = torch.randn(2, 12, 5)
    attention = torch.rand(2, 12) + 0.1
    nodes = build_nodes(descriptors, attention, (3, 4), (48, 64), 16, num_kept=9)
    assert nodes.shape == (2, 12, 8)
    kept = kept_node_mask(attention, 9)
    assert kept.sum(1).tolist() == [9, 9]
    assert (nodes[~kept] == 0).all()
    lowest = attention.argsort(dim=1)[:, :3]
    assert (~kept).nonzero()[:, 1].reshape(2, 3).sort(1).values.tolist() == lowest.sort(1).values.tolist()
    torch.testing.assert_close(nodes[kept][:, 3:], descriptors[kept])
    torch.testing.assert_close(nodes[..., 2].amax(1), torch.ones(2))
    with pytest.raises(ValueError, match="num_kept_nodes must be in"):
        kept_node_mask(attention, 13)


def test_network_shapes_and_rerank():
    config = ModelConfig(backbone="deit_micro", image_size=(112, 128), local_dim=16)
    network = PRGSNetwork(config).eval()
    assert config.num_kept_nodes == 56 * 5 // 6 and config.grid == (7, 8)
    images = torch.randn(4, 3, 112, 128)
    with torch.no_grad():
        global_descriptor, local = network(images)
        probabilities = network.rerank(local[:2], local[2:].unsqueeze(0).expand(2, -1, -1, -1))
    assert global_descriptor.shape == (4, 256) and local.shape == (4, 56, 19)
    assert probabilities.shape == (2, 2)


def test_bf16_autocast_inference_runs():
    network = PRGSNetwork(ModelConfig(backbone="deit_micro", image_size=(112, 112), local_dim=8)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        global_descriptor, local = network(torch.randn(2, 3, 112, 112))
    assert local.dtype == torch.float32 and torch.isfinite(global_descriptor.float()).all()
    assert ((local.abs().sum(-1) == 0).sum(1) == 49 - 49 * 5 // 6).all()


def test_model_config_validation():
    with pytest.raises(ValueError, match="unknown backbone"):
        ModelConfig(backbone="vgg16")
    with pytest.raises(ValueError, match=r"num_kept_nodes must be in \[1, 1200\]"):
        ModelConfig(num_kept_nodes=1500)
    with pytest.raises(ValueError, match="too small"):
        ModelConfig(image_size=(64, 640))
    with pytest.raises(ValueError, match="unknown model configuration keys"):
        ModelConfig.from_dict({"backbone": "deit_small", "colour": 3})
    assert ModelConfig().num_kept_nodes == 1000
    assert ModelConfig.from_dict(ModelConfig().to_dict()) == ModelConfig()


def test_imagenet_weights_load_from_a_local_timm_file(tmp_path):
    import timm

    reference = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    path = tmp_path / "deit_tiny_distilled_patch16_224.pth"
    torch.save(reference.state_dict(), path)
    backbone = build_backbone("deit_tiny", (64, 80), out_dim=256)
    load_imagenet_weights(backbone, path)
    torch.testing.assert_close(backbone.blocks[3].attn.qkv.weight, reference.blocks[3].attn.qkv.weight)
    torch.testing.assert_close(backbone.head.weight, reference.head.weight[:256])
    torch.testing.assert_close(backbone.head_dist.weight, reference.head_dist.weight[:256])
    assert backbone.pos_embed.shape == (1, 2 + 20, 192)
    torch.testing.assert_close(backbone.pos_embed[:, :2], reference.pos_embed[:, :2])


def test_imagenet_weights_of_another_architecture_are_refused(tmp_path):
    import timm

    path = tmp_path / "small.pth"
    torch.save(timm.create_model("deit_small_distilled_patch16_224", pretrained=False).state_dict(), path)
    with pytest.raises(ValueError, match="mis-shaped"):
        load_imagenet_weights(build_backbone("deit_tiny", (64, 64), 256), path)


def test_per_image_norm_removes_a_gain_and_offset_per_channel():
    images = torch.rand(2, 3, 32, 48)
    gain, offset = torch.tensor([0.4, 0.5, 0.9]).view(1, 3, 1, 1), torch.tensor([-0.3, 0.1, 0.2]).view(1, 3, 1, 1)
    torch.testing.assert_close(
        standardize_images(images * gain + offset), standardize_images(images), atol=1e-4, rtol=0
    )
    flat = standardize_images(images).flatten(2)  # (2, 3, H*W)
    torch.testing.assert_close(flat.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    # the network applies it only when configured to
    config = ModelConfig(backbone="deit_micro", image_size=(112, 128), local_dim=16, input_norm="per_image")
    torch.manual_seed(0)
    network = PRGSNetwork(config).eval()
    darker = torch.rand(1, 3, 112, 128)
    with torch.no_grad():
        torch.testing.assert_close(network(darker * 0.5 - 0.2, True), network(darker, True), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="input_norm must be one of"):
        ModelConfig(input_norm="per_batch")


def test_local_head_init_sets_the_scale_of_fresh_local_descriptors():
    """'reference' keeps the reference's N(0, 0.01); 'xavier' starts about 10x larger (docs/toy_world.md)."""
    stds = {}
    for init in ("reference", "xavier"):
        torch.manual_seed(0)
        config = ModelConfig(backbone="deit_micro", image_size=(112, 128), local_dim=16, local_head_init=init)
        stds[init] = float(PRGSNetwork(config).local_head.weight.std())
    token_dim = PRGSNetwork(ModelConfig(backbone="deit_micro", image_size=(112, 128), local_dim=16)).backbone.token_dim
    assert stds["reference"] == pytest.approx(0.01, rel=0.1)
    assert stds["xavier"] == pytest.approx((2.0 / (token_dim + 16)) ** 0.5, rel=0.1)
    with pytest.raises(ValueError, match="local_head_init must be one of"):
        ModelConfig(local_head_init="zeros")
