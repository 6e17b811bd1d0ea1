"""The fast paths compute the plain path's function: the precomputed stage-0 self graph (float64), the channels-last
pooling (float64), the fused Triton attention (Triton's interpreter on the CPU); the store tiers give the reranker
the same input; the image decoders give the same pixels (within a grey level)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import reranking
from config import EvalSettings
from datasets_ws import SplitRequest, load_split
from extraction import ExtractionSettings, image_batches
from feature_store import LocalFeatureStore, MemoryFeatureStore, StoreLayout, choose_tier, create_store
from model.l2_attention import l2_graph_attention, round_to_tf32, split_width
from model.local_features import build_nodes
from model.network import ModelConfig, PRGSNetwork
from model.reranker import PLAIN, RERANK_KERNELS, GraphReranker, RerankKernel, rerank_kernel
from places.images import (
    BadImageError,
    decode_images,
    load_image,
    load_image_uint8,
    normalize_images,
    read_image_bytes,
)
from reranking import CudaGraphCache

GRID = (30, 40)
STAGE0 = RERANK_KERNELS["stage0"]


def _golden(golden_dir, dtype):
    reranker = GraphReranker()
    reranker.load_state_dict(torch.load(golden_dir / "reranker_state_dict.pt", weights_only=True))
    nodes = torch.load(golden_dir / "reranker_io.pt", weights_only=True)["x_rerank"]
    expected = torch.load(golden_dir / "reranker_io_f64.pt", weights_only=True)["logits"]
    return reranker.to(dtype).eval(), nodes.to(dtype), expected


def _through_the_store(layout: StoreLayout, reranker: GraphReranker, nodes: torch.Tensor) -> torch.Tensor:
    """nodes (B, N, L, C) -> the stage-0 rows a "stage0" store gives back (kept rows + one shared zeroed row), in
    the nodes' dtype."""
    batch, group = nodes.shape[:2]
    flat = nodes.flatten(0, 1)  # (B*N, L, C): each image alone, as feature extraction computes it
    stage0 = reranker.stage0_self_graph(flat.unsqueeze(1), layout.grid)[:, 0]
    values, positions = layout.compact(flat, stage0)
    return layout.expand(values, positions, dtype=nodes.dtype).reshape(batch, group, *flat.shape[1:])


def test_precomputed_stage0_equals_the_plain_path_in_float64(golden_dir):
    """The stage-0 rows a store returns equal the plain path's stage-0 output to 1e-12 (the zeroed rows collapse to
    one: they differ by ~1e-16 before). The logits then agree to 1e-7: in float64 the plain path itself is only
    defined to ~1e-8, because distances between identical rows are square roots of rounding noise (golden
    README); recomputing stage 0 one image at a time instead of in the batch moves the logits by 1.1e-8 too."""
    reranker, nodes, expected = _golden(golden_dir, torch.float64)
    layout = StoreLayout(GRID, (480, 640), 16, num_kept=1000, local_dim=128, content="stage0")
    captured = []
    hook = reranker.selfnode_graph_layers[0].register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        plain = reranker(nodes, GRID)
        hook.remove()
        plain_stage0 = captured[0]
        stored = _through_the_store(layout, reranker, nodes)
        torch.testing.assert_close(stored, plain_stage0, rtol=0, atol=1e-12)
        from_stage0 = reranker(stored, GRID, STAGE0)
        exact_split = reranker(plain_stage0, GRID, STAGE0)
    assert torch.equal(exact_split, plain)  # the forward split at stage 0 is the same computation, bit for bit
    torch.testing.assert_close(from_stage0, plain, rtol=0, atol=1e-7)
    torch.testing.assert_close(from_stage0, expected, rtol=0, atol=1e-6)  # the golden tolerance


def test_channels_last_pooling_is_the_same_function_in_float64(golden_dir):
    reranker, nodes, expected = _golden(golden_dir, torch.float64)
    channels_last = RerankKernel("stage0_channels_last", True, "cdist", True)
    with torch.no_grad():
        stage0 = reranker.stage0_self_graph(nodes, GRID)
        logits = reranker(stage0, GRID, channels_last)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)


def test_precomputed_stage0_in_float32_keeps_the_golden_order(golden_dir):
    reranker, nodes, expected = _golden(golden_dir, torch.float32)
    layout = StoreLayout(GRID, (480, 640), 16, num_kept=1000, local_dim=128, content="stage0", feature_dtype="float32")
    with torch.no_grad():
        logits = reranker(_through_the_store(layout, reranker, nodes), GRID, STAGE0)
    torch.testing.assert_close(logits.double(), expected, rtol=0, atol=1e-3)
    assert torch.equal(logits.softmax(-1)[..., 1].argsort(-1), expected.softmax(-1)[..., 1].argsort(-1))


def test_kernel_names_and_errors():
    assert rerank_kernel("plain") is PLAIN and not PLAIN.precomputed_stage0
    assert {k.name for k in RERANK_KERNELS.values() if k.fused} == {"fused_tf32", "fused_bf16"}
    with pytest.raises(ValueError, match="unknown reranker kernel 'fast'; choose one of plain, stage0"):
        rerank_kernel("fast")
    assert split_width(131) == (128, 16) and split_width(35) == (32, 16) and split_width(32) == (32, 0)
    x = torch.randn(1000)
    assert ((round_to_tf32(x) - x).abs() <= x.abs() * 2**-11).all()
    assert torch.equal(round_to_tf32(round_to_tf32(x)), round_to_tf32(x))


# ----------------------------------------------------------------------------------------------------------------
# The fused kernel, in Triton's interpreter


@pytest.fixture
def triton_interpreter():
    """Without a GPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1 before any import)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("these tests run the fused kernel in Triton's interpreter (TRITON_INTERPRET=1, set by conftest)")


def _attention_float64(q, h, temperature, lamda):
    logits = -torch.cdist(q.double(), h.double()) / temperature + lamda * torch.eye(h.shape[-2], dtype=torch.float64)
    return logits.softmax(-1) @ h.double()


# precision -> tolerance on the aggregated features (values ~1) against float64. Measured in the interpreter: ieee
# 2e-6, or 4e-5 where identical rows meet (the distance from norms and dot products is the sqrt of rounding noise,
# as torch.cdist's own formula beyond 25 rows); tf32 1.6e-3 (operands rounded to 10 mantissa bits); bf16 1.3e-2
# (operands and weights rounded to 7 bits)
ATTENTION_TOLERANCE = {"ieee": 1e-4, "tf32": 5e-3, "bf16": 4e-2}


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 3, 40, 35), (1, 2, 33, 131), (1, 2, 20, 11)])
def test_fused_attention_matches_float64(triton_interpreter, precision, shape):
    generator = torch.Generator().manual_seed(sum(shape))
    h = torch.randn(*shape, generator=generator)
    h[:, :, :6] = h[:, :, :1]  # identical rows, as the zeroed nodes are: their distance must stay ~0
    for q in (h, h[:, :1]):  # self graph, cross graph
        out = torch.full_like(h, float("nan"))
        out.copy_(l2_graph_attention(q, h, 0.5, torch.tensor([0.3]), precision))
        expected = _attention_float64(q, h, 0.5, 0.3)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=ATTENTION_TOLERANCE[precision])


# kernel -> tolerance on the logits against the plain float32 path; measured in the interpreter over 3 seeds:
# fused_tf32 at most 1.2e-4, fused_bf16 at most 1.0e-3 (the plain path is 1.6e-6 from float64 here)
RERANKER_TOLERANCE = {"fused_tf32": 1e-3, "fused_bf16": 1e-2}


@pytest.mark.parametrize("name", ["fused_tf32", "fused_bf16"])
def test_fused_reranker_matches_the_plain_path(triton_interpreter, name):
    """The whole reranker on an 8x10 grid (35-d nodes, 4 images, 14 zeroed nodes each): stage 0 and the rest with
    the fused kernel against the plain float32 path: logits within the stated tolerance, the same order."""
    torch.manual_seed(1)
    reranker = GraphReranker(node_dim=35, grid=(8, 10)).eval()
    nodes = torch.randn(1, 4, 80, 35)
    nodes[:, :, 66:] = 0.0
    kernel = RERANK_KERNELS[name]
    with torch.no_grad():
        plain = reranker(nodes, (8, 10))
        fused = reranker(reranker.stage0_self_graph(nodes, (8, 10), kernel.attention), (8, 10), kernel)
    torch.testing.assert_close(fused, plain, rtol=0, atol=RERANKER_TOLERANCE[name])
    assert torch.equal(fused[..., 1].argsort(-1), plain[..., 1].argsort(-1))


def test_fused_kernel_refuses_the_cpu_and_gradients(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h = torch.randn(1, 2, 20, 11)
    with pytest.raises(RuntimeError, match="runs on CUDA .*use --rerank_kernel stage0"):
        l2_graph_attention(h, h, 0.5, torch.tensor([0.1]))
    reranker = GraphReranker(node_dim=11, grid=(7, 7))
    with pytest.raises(ValueError, match="inference only"):
        reranker(torch.randn(1, 2, 49, 11), (7, 7), RERANK_KERNELS["fused_tf32"])


# ----------------------------------------------------------------------------------------------------------------
# Store tiers


def _toy_nodes(count, seed, grid=(9, 12), local_dim=32, num_kept=90):
    generator = torch.Generator().manual_seed(seed)
    descriptors = torch.randn(count, grid[0] * grid[1], local_dim, generator=generator)
    attention = torch.rand(count, grid[0] * grid[1], generator=generator)
    return build_nodes(descriptors, attention, grid, (grid[0] * 16, grid[1] * 16), 16, num_kept)


@pytest.mark.parametrize("content", ["nodes", "stage0"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_store_tiers_give_identical_reranked_predictions(tmp_path, content, dtype):
    """The same images written to the device (here: the CPU), host and disk tiers rebuild bit-identical reranker
    inputs and give identical reranked predictions and scores."""
    torch.manual_seed(5)
    model = PRGSNetwork(ModelConfig(backbone="deit_micro", image_size=(144, 192), local_dim=32)).eval()
    nodes = _toy_nodes(30, seed=1)  # 24 database images, 6 queries
    kernel = "stage0" if content == "stage0" else "plain"
    with torch.no_grad():
        stage0 = model.stage0_nodes(nodes) if content == "stage0" else None
    layout = StoreLayout((9, 12), (144, 192), 16, 90, 32, content=content, feature_dtype=dtype)
    rng = np.random.default_rng(0)
    predictions = np.stack([rng.permutation(24)[:10] for _ in range(6)])
    distances = np.sort(rng.random((6, 10)), axis=1).astype(np.float32)
    settings = EvalSettings((144, 192), torch.device("cpu"), rerank_top=8, rerank_batch_size=4)
    settings.rerank_kernel = kernel
    results = {}
    for tier in ("device", "host", "disk"):
        store = create_store(tmp_path / tier, 30, layout, tier, torch.device("cpu"))
        order = rng.permutation(30)
        for part in np.array_split(order, 4):  # written out of order, in batches
            store.write(part, nodes[part], None if stage0 is None else stage0[part])
        store = store.finish()
        assert store.tier == tier and store.content == content and store.bytes_per_image == layout.bytes_per_image
        results[tier] = (
            store.read(np.arange(30)),
            *reranking.rerank(model, store, predictions, distances, 24, settings)[:2],
        )
        store.close()
    for tier in ("host", "disk"):
        assert torch.equal(results[tier][0], results["device"][0])
        assert np.array_equal(results[tier][1], results["device"][1])
        assert np.array_equal(results[tier][2], results["device"][2])
    assert not np.array_equal(results["disk"][1][:, :8], predictions[:, :8])  # the reranker did re-sort


def test_stage0_store_size_and_tier_choice(tmp_path):
    layout = StoreLayout(GRID, (480, 640), 16, 1000, 128, content="stage0")
    assert layout.rows == 1001 and layout.channels == 131
    assert layout.bytes_per_image == 1001 * 131 * 2 + 1000 * 2
    assert (
        StoreLayout(GRID, (480, 640), 16, 1000, 128, feature_dtype="float32").bytes_per_image == 1000 * 129 * 4 + 2000
    )
    assert choose_tier("disk", 10, layout, torch.device("cpu")) == ("disk", "--store_tier disk")
    assert choose_tier("auto", 10, layout, torch.device("cpu"))[0] == "host"
    assert choose_tier("auto", 10**9, layout, torch.device("cpu"))[0] == "disk"
    with pytest.raises(ValueError, match="store tier must be auto or one of"):
        choose_tier("gpu", 10, layout, torch.device("cpu"))
    with pytest.raises(ValueError, match="needs the stage-0 output"):
        create_store(tmp_path / "s", 2, StoreLayout((9, 12), (144, 192), 16, 90, 32, content="stage0"), "host",
                     torch.device("cpu")).write([0], _toy_nodes(1, 0))  # fmt: skip
    assert isinstance(create_store(tmp_path / "d", 1, layout, "disk", torch.device("cpu")), LocalFeatureStore)
    assert isinstance(create_store(tmp_path / "m", 1, layout, "device", torch.device("cpu")), MemoryFeatureStore)


def test_a_kernel_refuses_a_store_of_the_other_content(tmp_path):
    model = PRGSNetwork(ModelConfig(backbone="deit_micro", image_size=(144, 192), local_dim=32)).eval()
    store = create_store(tmp_path, 2, StoreLayout((9, 12), (144, 192), 16, 90, 32), "host", torch.device("cpu"))
    store.write([0, 1], _toy_nodes(2, 0))
    settings = EvalSettings((144, 192), torch.device("cpu"), rerank_top=1, rerank_kernel="stage0")
    with pytest.raises(ValueError, match="kernel stage0 cannot read a store of 'nodes' rows"):
        reranking.rerank(model, store.finish(), np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32), 1, settings)


# ----------------------------------------------------------------------------------------------------------------
# Image decoding


def test_uint8_loading_normalised_on_the_device_equals_load_image(small_toy_world):
    index = load_split(SplitRequest(small_toy_world, "toy_world", "test"))
    path = index.absolute_path(0)
    for size in ((144, 192), (96, 128)):  # the file's size, and a resize
        expected = load_image(path, size)
        assert torch.equal(normalize_images(load_image_uint8(path, size)[None])[0], expected)


def test_torchvision_decoder_matches_pil(small_toy_world, tmp_path):
    """Decoding on the device (here the CPU: libjpeg through torchvision) gives PIL's pixels within one grey level;
    a PNG falls back to PIL, a broken JPEG is named."""
    index = load_split(SplitRequest(small_toy_world, "toy_world", "test"))
    paths = [index.absolute_path(i) for i in range(4)]
    png = tmp_path / "image.png"
    Image.open(paths[0]).save(png)
    paths.append(png)
    encoded = [read_image_bytes(p) for p in paths]
    decoded = decode_images(encoded, paths, (144, 192), torch.device("cpu"))
    expected = torch.stack([load_image_uint8(p, (144, 192)) for p in paths])
    assert decoded.dtype == torch.uint8 and decoded.shape == expected.shape
    assert (decoded.int() - expected.int()).abs().max() <= 1
    resized = decode_images(encoded[:2], paths[:2], (72, 96), torch.device("cpu"))
    assert (resized.float() - torch.stack([load_image_uint8(p, (72, 96)) for p in paths[:2]]).float()).abs().mean() < 2
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(paths[1]).read_bytes()[:300])
    with pytest.raises(BadImageError, match="broken.jpg"):
        decode_images([read_image_bytes(broken)], [broken], (144, 192), torch.device("cpu"))


def test_image_loop_gives_the_same_descriptors_with_either_decoder(small_toy_world):
    index = load_split(SplitRequest(small_toy_world, "toy_world", "test"))
    model = PRGSNetwork(ModelConfig(backbone="deit_micro", image_size=(144, 192), local_dim=32))
    outputs = {}
    for decoder in ("pil", "torchvision"):
        batches = image_batches(model, lambda images: model(images, global_only=True), index, range(10),
                                ExtractionSettings((144, 192), torch.device("cpu"), 4, 0, decoder=decoder))  # fmt: skip
        ids, descriptors = zip(*batches)
        assert np.array_equal(np.concatenate(ids), np.arange(10))
        outputs[decoder] = torch.cat(descriptors)
    torch.testing.assert_close(outputs["torchvision"], outputs["pil"], rtol=0, atol=2e-2)


def test_cuda_graph_cache_runs_eagerly_without_cuda():
    calls = []
    cache = CudaGraphCache(lambda x: calls.append(x) or x * 2)
    assert torch.equal(cache(torch.ones(3)), torch.full((3,), 2.0)) and len(calls) == 1 and not cache.graphs


def test_test_py_refuses_a_fused_kernel_on_the_cpu(small_toy_world, tmp_path, monkeypatch):
    import test as test_script
    from util import PRGSError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(PRGSError, match="--rerank_kernel fused_tf32 runs on CUDA only .* use stage0"):
        test_script.main(["--datasets_folder", str(small_toy_world), "--device", "cpu", "--rerank_kernel", "fused_tf32",
                          "--num_workers", "0"])  # fmt: skip
