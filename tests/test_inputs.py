"""Inputs from outside: no bad number passes a boundary, no bad input ends in a traceback. Checkpoints are checked
finite, files read back follow their schema, the API refuses what it cannot take with its one error type, the
parser range-checks numbers; property-based tests search the API's inputs and the image decoder for counter-examples.
"""

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

import api
import feature_store
import runs
import test as test_script
from datasets_ws import SplitRequest, load_split
from mining import MiningFileError, dataset_fingerprints, image_file_stats, load_hard_negatives, save_hard_negatives
from model.checkpoint import CheckpointError, open_checkpoint, save_model
from model.network import ModelConfig, PRGSNetwork
from parser import train_parser
from places.images import BadImageError, open_rgb_image
from schema import Field, FileFormatError, check_fields

SIZE = (112, 128)  # a 7x8 patch grid: the smallest the reranker takes, on a deit_micro
FAST_PROPERTIES = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def network() -> PRGSNetwork:
    torch.manual_seed(0)
    return PRGSNetwork(ModelConfig(backbone="deit_micro", image_size=SIZE, local_dim=8)).eval()


@pytest.fixture(scope="module")
def model(network) -> api.PRGS:
    return api.PRGS(network)


@pytest.fixture(scope="module")
def described(model) -> api.Description:
    """Three images at the model's size, then two at its transpose."""
    landscape = model.describe(torch.randn(3, 3, *SIZE))
    portrait = model.describe(torch.randn(2, 3, *SIZE[::-1]))
    return api.Description(
        torch.cat([landscape.global_descriptors, portrait.global_descriptors]),
        torch.cat([landscape.local_features, portrait.local_features]),
    )


def run_script(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, the last line on stderr) of a script's main() run as its __main__ does; no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        runs.run_entry_point(lambda: main(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return stopped.value.code, err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_a_checkpoint_with_one_nan_weight_is_refused_naming_the_key_and_the_file(network, tmp_path, capsys):
    path = tmp_path / "nan.pth"
    weights = network.state_dict()
    broken = PRGSNetwork(network.config)
    broken.load_state_dict(weights)
    with torch.no_grad():
        broken.reranker.classifier.bias[0] = float("nan")
    save_model(broken, path)
    with pytest.raises(CheckpointError, match=rf"{path}: tensor model_state_dict.reranker.classifier.bias .*NaN"):
        open_checkpoint(path)
    with pytest.raises(api.InputError, match="reranker.classifier.bias"):
        api.load_model(path)
    status, line = run_script(test_script.main, ["--resume", str(path), "--device", "cpu"], capsys)
    assert status == 2 and "model_state_dict.reranker.classifier.bias (2,) holds 1 NaN or infinite value" in line


def test_a_folder_given_as_a_checkpoint_is_called_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path} is a folder, expected a checkpoint file"):
        open_checkpoint(tmp_path)
    with pytest.raises(api.InputError, match="is a folder, expected a checkpoint file"):
        api.load_model(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Files read back: one schema


def test_a_field_that_breaks_its_schema_is_named_with_the_file():
    schema = {
        "rows": Field("i", ("N", None), minimum=-1),
        "sizes": Field("iu", ("N",)),
        "kind": Field("U", choices=("a",)),
        "picks": Field("iu", (None,), minimum=0, below="N"),  # indices into the N rows
    }
    good = {"rows": np.zeros((3, 2), np.int64), "sizes": np.arange(3), "kind": "a", "picks": np.array([2, 0])}
    assert check_fields("f.npz", good, schema) == {"N": 3}
    for field, value, problem in [
        ("rows", np.zeros((3, 2), np.float32), "has dtype float32"),
        ("rows", np.zeros(3, np.int64), "expected integer of rank 2"),
        ("rows", np.full((3, 2), -2), "holds -2"),
        ("sizes", np.arange(4), "has 4 entries along axis 0"),
        ("kind", "b", "is 'b', expected one of 'a'"),
        ("kind", True, "has dtype bool"),
        ("picks", np.array([0, 3]), r"holds 3, expected values < 3 \(N\)"),
    ]:
        with pytest.raises(FileFormatError, match=f"f.npz: field '{field}' .*{problem}"):
            check_fields("f.npz", {**good, field: value}, schema, hint="rebuild it")
    with pytest.raises(FileFormatError, match="field 'sizes' is missing"):
        check_fields("f.npz", {"rows": good["rows"], "kind": "a", "picks": good["picks"]}, schema)


@pytest.fixture(scope="module")
def train_index(small_toy_world):
    return load_split(SplitRequest(small_toy_world, "toy_world", "train"))


def _save_hand_edited(path: Path, index, edit) -> None:
    """A valid hard-negative file of ``index``, then edited as a hand would: ``edit(arrays)`` -> the arrays to
    replace (None: remove)."""
    save_hard_negatives(
        path,
        np.tile(np.arange(10), (index.queries_num, 1)),
        {"dataset": index.name, **dataset_fingerprints(index)},
        image_file_stats(index),
    )
    with np.load(path) as data:
        arrays = {name: data[name] for name in data.files}
    arrays.update(edit(arrays))
    np.savez(path, **{name: value for name, value in arrays.items() if value is not None})


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda a: {"hard_negatives": a["hard_negatives"] * 1.0}, r"field 'hard_negatives' has dtype float64"),
        (
            lambda a: {"hard_negatives": a["hard_negatives"][:, 0]},
            r"'hard_negatives' has dtype int64 and shape \(\d+,\)",
        ),
        (
            lambda a: {"image_sizes": a["image_sizes"][1:], "image_mtimes_ns": a["image_mtimes_ns"][1:]},
            r"'image_sizes' has \d+ entries, expected one per image",
        ),
        (lambda a: {"image_mtimes_ns": a["image_mtimes_ns"][:-1]}, r"'image_mtimes_ns' has \d+ entries along axis 0"),
        (lambda a: {"image_mtimes_ns": None}, r"field 'image_mtimes_ns' is missing"),
        (lambda a: {"metadata": np.array("[1, 2]")}, r"field 'metadata' holds a JSON list, expected an object"),
        (lambda a: {"metadata": np.array("{not json")}, r"field 'metadata' is not JSON"),
    ],
)
def test_a_hand_edited_hard_negative_file_is_one_line_naming_the_field(train_index, tmp_path, edit, expected):
    path = tmp_path / "hn.npz"
    _save_hand_edited(path, train_index, edit)
    with pytest.raises(MiningFileError, match=expected) as refused:
        load_hard_negatives(path, train_index, 5, "python pre_compute_mining.py ...")
    assert "\n" not in str(refused.value) and "Rebuild it with: python pre_compute_mining.py" in str(refused.value)


def test_the_references_npy_hard_negative_list_is_named_as_such(tmp_path):
    path = tmp_path / "msls_v2_deit_hard_final_distance.npy"
    np.save(path, np.full((4, 200), -1, dtype=np.int64))
    with pytest.raises(MiningFileError, match=r"bare \.npy array \(4, 200\), the reference's hard-negative list") as e:
        load_hard_negatives(path, None, 5, "python pre_compute_mining.py ...")
    assert "context manager" not in str(e.value) and "Mine this project's .npz instead" in str(e.value)


def test_a_hand_edited_store_header_is_one_line_naming_the_field(tmp_path):
    layout = feature_store.StoreLayout(grid=(7, 8), image_size=SIZE, patch_size=16, num_kept=40, local_dim=8)
    store = feature_store.LocalFeatureStore.create(tmp_path / "store", 1, layout=layout)
    nodes = torch.zeros(1, 56, 11)
    nodes[0, :40, 0] = 1.0
    store.write([0], nodes)
    store.close()
    header_path = tmp_path / "store" / "store.json"
    header = json.loads(header_path.read_text())
    for field, value, problem in [
        ("grid", "7x8", "has dtype <U3"),
        ("num_kept", 40.0, "has dtype float64"),
        ("num_kept", 500, "num_kept must be in"),
        ("content", "patches", "is 'patches', expected one of 'nodes', 'stage0'"),
        ("patch_size", 0, "holds 0, expected values >= 1"),
    ]:
        header_path.write_text(json.dumps({**header, field: value}))
        with pytest.raises(FileFormatError, match=problem) as refused:
            feature_store.LocalFeatureStore.open(tmp_path / "store")
        assert str(header_path) in str(refused.value)
    header_path.write_text("[1, 2]")
    with pytest.raises(FileFormatError, match="expected prgs-local-feature-store version 2, found list"):
        feature_store.LocalFeatureStore.open(tmp_path / "store")


# ----------------------------------------------------------------------------------------------------------------
# The API: regressions


def test_describe_of_uint8_pixels_is_describe_of_the_same_pil_images(model):
    pixels = torch.randint(0, 256, (2, 3, 90, 150), dtype=torch.uint8)  # another size: resized as preprocess does
    pil = [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in pixels]
    expected = model.describe(pil)
    for given_pixels in (pixels, pixels.numpy(), pixels[0]):
        result = model.describe(given_pixels)
        count = len(result.global_descriptors)
        torch.testing.assert_close(result.global_descriptors, expected.global_descriptors[:count], atol=1e-6, rtol=0)
        torch.testing.assert_close(result.local_features, expected.local_features[:count], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "images, expected",
    [
        (torch.zeros(*SIZE), r"must be \(B, 3, H, W\) or \(3, H, W\) RGB, got shape \(112, 128\)"),
        (torch.zeros(1, 1, 3, *SIZE), r"got shape \(1, 1, 3, 112, 128\)"),
        (torch.zeros(1, 1, *SIZE), r"RGB, got shape \(1, 1, 112, 128\)"),
        (np.zeros((*SIZE, 3), np.uint8), r"channels first: transpose an \(H, W, 3\) array"),
        (torch.zeros(1, 3, *SIZE, dtype=torch.int64), "images of dtype torch.int64: give uint8 pixels"),
        (np.zeros((1, 3, *SIZE), np.str_), "numpy dtype <U1, expected numbers"),
        (torch.zeros(1, 3, 100, 128), "sides must be multiples of the patch size 16"),
        (torch.zeros(1, 3, 64, 64), "4x4 patch grid, too small for local features: at least 7x7 patches"),
        (torch.full((1, 3, *SIZE), float("nan")), "NaN or infinite"),
        (torch.zeros(0, 3, *SIZE), "hold no image"),
        ([], "got no images"),
        ("a.jpg", r"wrap a single image in a list"),
        ([3], "expected an image path or a PIL image, got int"),
        (["/no/such/image.jpg"], "cannot decode image /no/such/image.jpg"),
        ([Image.new("F", (8, 8))], "has mode F"),
    ],
)
def test_describe_refuses_what_it_cannot_take_with_the_apis_error(model, images, expected):
    with pytest.raises(api.InputError, match=expected):
        model.describe(images)


def test_correspondences_refuse_a_stage_out_of_range(model, described):
    local = described.local_features
    for stage in (-1, 3, 1.0, True, "1"):
        with pytest.raises(api.InputError, match=r"stage must be an int in \[0, 2\]"):
            model.correspondences(local[0], local[1:3], stage=stage)


def test_rerank_refuses_mixed_grids_and_takes_the_transpose_on_its_own(model, network, described):
    local = described.local_features  # 0-2 at 112x128, 3-4 at 128x112: the same 56 nodes, another grid
    with pytest.raises(
        api.InputError, match=r"candidates \[1\] of candidates_local .* not described on the query's 7x8"
    ):
        model.rerank(local[0], local[[1, 3, 2]])
    with pytest.raises(api.InputError, match=r"candidates \[0, 1\] .*on the query's 8x7 patch grid"):
        model.rerank(local[3], local[:2])
    portrait = model.rerank(local[3], local[4:])  # reranked on the 8x7 grid they were described on
    torch.testing.assert_close(portrait, network.rerank(local[3][None], local[4:][None], grid=(8, 7))[0])
    other = model.describe(torch.zeros(2, 3, 128, 128)).local_features  # 8x8: another node count
    with pytest.raises(api.InputError, match=r"query_local \(64, 11\) was not described at 112x128"):
        model.rerank(other[0], other[1:])
    with pytest.raises(api.InputError, match=r"candidates \[0\]"):
        model.rerank(local[0], other[:1])


# ----------------------------------------------------------------------------------------------------------------
# The parser: every number range-checked


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--seed", "-1"),
        ("--seed", str(2**32)),
        ("--weight_decay", "-0.1"),
        ("--weight_decay", "nan"),
        ("--grad_clip", "-1"),
        ("--grad_clip", "inf"),
        ("--rerank_fusion", "nan"),
        ("--lr", "nan"),
    ],
)
def test_numeric_flags_out_of_range_are_refused_by_the_parser(flag, value, capsys):
    with pytest.raises(SystemExit) as stopped:
        train_parser().parse_args([flag, value])
    assert stopped.value.code == 2 and f"argument {flag}: expected " in capsys.readouterr().err


def test_the_seed_takes_numpys_whole_range():
    for seed in ("0", str(2**32 - 1)):
        assert train_parser().parse_args(["--seed", seed]).seed == int(seed)


# ----------------------------------------------------------------------------------------------------------------
# Property-based: the API's inputs

DTYPES = ["uint8", "float32", "float64", "float16", "int64", "int16", "bool"]


@st.composite
def image_arrays(draw):
    """Arrays of random rank, channels, dtype and size, as a torch tensor or a numpy array."""
    rank = draw(st.integers(1, 5))
    shape = [draw(st.integers(0, 4)) for _ in range(rank)]
    if rank >= 3 and draw(st.booleans()):
        shape[-3] = 3  # often an RGB image, so that sizes get explored too
    if rank >= 2:
        shape[-2] = draw(st.sampled_from([0, 1, 16, 50, 96, 112, 128]))
        shape[-1] = draw(st.sampled_from([1, 16, 48, 112, 128, 130]))
    dtype = draw(st.sampled_from(DTYPES))
    array = np.random.default_rng(draw(st.integers(0, 9))).uniform(-3, 300, size=shape).astype(dtype)
    return array if draw(st.booleans()) else torch.from_numpy(array)


@FAST_PROPERTIES
@given(images=image_arrays())
def test_describe_gives_descriptors_or_the_apis_error(model, images):
    try:
        result = model.describe(images)
    except api.InputError:
        return
    count = 1 if images.ndim == 3 else images.shape[0]
    assert result.global_descriptors.shape == (count, model.network.config.fc_output_dim)
    assert torch.isfinite(result.global_descriptors).all() and torch.isfinite(result.local_features).all()


@st.composite
def local_feature_pairs(draw, described: api.Description):
    """(query, candidates): real describe outputs picked, transposed, cut, cast or spoilt at random."""
    local = described.local_features
    picks = draw(st.lists(st.integers(0, len(local) - 1), min_size=1, max_size=4))
    query, candidates = local[draw(st.integers(0, len(local) - 1))], local[picks]
    spoil = draw(st.sampled_from(["none", "rank", "channels", "dtype", "nan", "nodes", "numpy", "empty", "float64"]))
    if spoil == "rank":
        query = query[None]
    elif spoil == "channels":
        candidates = candidates[..., :-1]
    elif spoil == "dtype":
        candidates = candidates.to(torch.int64)
    elif spoil == "nan":
        candidates = candidates.clone()
        candidates[0, 0, 0] = float("nan")
    elif spoil == "nodes":
        query = query[:-1]
    elif spoil == "numpy":
        query, candidates = query.numpy(), candidates.numpy()
    elif spoil == "empty":
        candidates = candidates[:0]
    elif spoil == "float64":
        query, candidates = query.double(), candidates.double()
    return query, candidates


@FAST_PROPERTIES
@given(data=st.data(), stage=st.integers(-2, 4))
def test_rerank_and_correspondences_give_probabilities_or_the_apis_error(model, described, data, stage):
    query, candidates = data.draw(local_feature_pairs(described))
    try:
        probabilities = model.rerank(query, candidates)
    except api.InputError:
        return
    assert probabilities.shape == (len(candidates),) and ((probabilities >= 0) & (probabilities <= 1)).all()
    try:
        same, attention, boxes = model.correspondences(query, candidates, stage=stage)
    except api.InputError:
        assert not 0 <= stage <= 2
        return
    torch.testing.assert_close(same, probabilities, atol=0, rtol=0)
    assert attention.shape[0] == len(candidates) and attention.shape[1] == len(boxes)


# ----------------------------------------------------------------------------------------------------------------
# Property-based: the image decoder

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F", "LAB", "HSV"]
ORIENTATION = 0x0112


@FAST_PROPERTIES
@given(
    mode=st.sampled_from(MODES),
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    orientation=st.integers(0, 9),
    file_format=st.sampled_from(["PNG", "JPEG", "TIFF", "WEBP", "BMP"]),
    cut=st.one_of(st.none(), st.integers(0, 400)),
    seed=st.integers(0, 9),
)
def test_the_decoder_gives_upright_rgb_or_a_bad_image_error(mode, width, height, orientation, file_format, cut, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    exif = Image.Exif()
    if orientation:
        exif[ORIENTATION] = orientation
    encoded = io.BytesIO()
    try:
        image = Image.fromarray(pixels, "RGB").convert(mode) if mode != "I;16" else Image.new(mode, (width, height))
        image.save(encoded, format=file_format, exif=exif.tobytes())
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)  # Pillow cannot make this mode, or write it in this format: nothing to decode
    data = encoded.getvalue() if cut is None else encoded.getvalue()[:cut]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"image.{file_format.lower()}"
        path.write_bytes(data)
        try:
            decoded = open_rgb_image(path)
        except BadImageError as error:
            assert str(path) in str(error)
            return
    assert decoded.mode == "RGB"
    if file_format == "TIFF" and orientation in (5, 6, 7, 8):
        return  # Pillow's libtiff reader of a file mis-turns quarter-turned TIFFs (its in-memory reader does not)
    with Image.open(io.BytesIO(data)) as stored:
        assert decoded.size == ImageOps.exif_transpose(stored).size  # Pillow's own reading of the orientation
