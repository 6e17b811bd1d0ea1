"""The two test-time preprocessings: 'pil' (this project's, and the reference's training one) and 'reference' (the
reference's test-time function, datasets_ws.py's BaseDataset.__getitem__), which must equal the reference's
transform bit for bit."""

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import parser as prgs_parser
from datasets_ws import ImageDataset
from places.images import IMAGENET_MEAN, IMAGENET_STD, load_image
from places.index import PlaceIndex


def reference_transform(path, size: tuple[int, int]) -> torch.Tensor:
    """The reference's test-time transform (datasets_ws.py, BaseDataset.__getitem__ with test_method='hard_resize'):
    PIL load -> RGB -> ToTensor -> Normalize -> transforms.functional.resize of the tensor to [H, W], bilinear, not
    antialiased (torchvision 0.13's default for tensors; later torchvision versions need antialias=False to do the
    same)."""
    base = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with Image.open(path) as image:
        tensor = base(image.convert("RGB"))
    return TF.resize(tensor, list(size), interpolation=T.InterpolationMode.BILINEAR, antialias=False)


def photo(path, width: int, height: int, seed: int = 0):
    """A JPEG with texture at every scale (smooth gradients plus noise), width x height."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    pixels = np.clip(smooth + rng.normal(0, 40, smooth.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


@pytest.mark.parametrize("source_size", [(600, 800), (200, 300), (481, 641), (300, 900)])  # (H, W)
def test_reference_preprocessing_equals_the_reference_transform_bit_for_bit(source_size, tmp_path):
    path = photo(tmp_path / "photo.jpg", source_size[1], source_size[0])
    ours = load_image(path, (480, 640), preprocessing="reference")
    expected = reference_transform(path, (480, 640))
    assert ours.shape == expected.shape == (3, 480, 640) and ours.dtype == torch.float32
    assert torch.equal(ours, expected)  # max difference 0
    pil = load_image(path, (480, 640), preprocessing="pil")
    assert (pil - expected).abs().max() > 0.01  # the option matters: the PIL path is another function


def test_reference_preprocessing_at_the_input_size_is_normalisation_only(tmp_path):
    path = photo(tmp_path / "photo.jpg", 640, 480)
    assert torch.equal(load_image(path, (480, 640), "reference"), reference_transform(path, (480, 640)))
    assert torch.allclose(load_image(path, (480, 640), "reference"), load_image(path, (480, 640), "pil"))


def test_image_dataset_uses_the_preprocessing_asked_for(tmp_path):
    for name in ("a", "b"):
        photo(tmp_path / f"{name}.jpg", 300, 200, seed=ord(name))
    index = PlaceIndex("x/test", tmp_path, ["a.jpg"], ["b.jpg"], None, None, None)
    image, _ = ImageDataset(index, (144, 192), "reference")[1]
    assert torch.equal(image, reference_transform(tmp_path / "b.jpg", (144, 192)))
    with pytest.raises(ValueError, match="preprocessing must be one of"):
        ImageDataset(index, (144, 192), "bicubic")


def test_the_reference_checkpoints_get_the_reference_preprocessing_by_default(tmp_path):
    full, global_only = tmp_path / "msls_train_prgs.pt", tmp_path / "msls_v2_deits.pth"
    torch.save({"model_state_dict": {"module.backbone.cls_token": torch.zeros(1, 1, 384)}}, full)
    torch.save({"module.cls_token": torch.zeros(1, 1, 384)}, global_only)
    for checkpoint in (full, global_only):
        assert prgs_parser.parse_test_args(["--resume", str(checkpoint)]).preprocessing == "reference"
        assert prgs_parser.parse_mining_args(["--resume", str(checkpoint)]).preprocessing == "reference"
        assert prgs_parser.parse_train_args(["--resume", str(checkpoint)]).preprocessing == "pil"  # trains ours
        chosen = prgs_parser.parse_test_args(["--resume", str(checkpoint), "--preprocessing", "pil"])
        assert chosen.preprocessing == "pil"
    assert prgs_parser.parse_test_args([]).preprocessing == "pil"
