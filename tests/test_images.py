"""Images on disk: finding every one once, decoding every mode to RGB or refusing it by name, and what changes
when one is replaced in place."""

import os

import numpy as np
import pytest
from PIL import Image
from short_runs import copy_world

from datasets_ws import SplitRequest, load_split
from mining import dataset_fingerprints, image_file_stats, load_hard_negatives, save_hard_negatives
from places.images import BadImageError, open_rgb_image, rgb_image
from places.walk import find_images

# ----------------------------------------------------------------------------------------------------------------
# Datasets


def test_a_symlink_loop_does_not_make_the_database_swallow_the_queries(small_toy_world, tmp_path, caplog):
    datasets = copy_world(small_toy_world, tmp_path)
    split = datasets / "toy_world" / "images" / "test"
    expected = load_split(SplitRequest(datasets, "toy_world", "test"))
    os.symlink("..", split / "database" / "loop")  # database/loop/queries/... would be listed as database
    os.symlink(split / "queries", split / "database" / "queries_link")
    index = load_split(SplitRequest(datasets, "toy_world", "test"))
    assert index.database_paths == expected.database_paths and index.queries_paths == expected.queries_paths
    assert "left out 2 symlinked folders, not followed" in caplog.text
    assert "loop" in caplog.text and "queries_link" in caplog.text


def test_every_image_once_and_what_was_skipped_is_named(tmp_path, caplog):
    folder = tmp_path / "database"
    folder.mkdir()
    for name in ("a.jpg", "b.JPG", "c.jpeg", "d.png"):
        Image.new("RGB", (4, 4)).save(folder / name, format="PNG" if name.endswith("png") else "JPEG")
    (folder / "notes.txt").write_text("not an image")
    (folder / "._a.jpg").write_bytes(b"AppleDouble")
    os.symlink("a.jpg", folder / "e.jpg")  # the same image under a second name
    os.symlink("missing.jpg", folder / "f.jpg")
    listing = find_images(folder)
    assert listing.images == ["a.jpg", "b.JPG", "c.jpeg", "d.png"]
    listing.warn_about_skipped(folder)
    for name in ("notes.txt", "._a.jpg", "e.jpg (= a.jpg)", "f.jpg"):
        assert name in caplog.text
    assert "extension is not one of .jpg, .jpeg, .png" in caplog.text


GRADIENT = np.arange(256).reshape(16, 16)


def _image_of_mode(mode: str) -> Image.Image:
    """A 16x16 grey gradient (0..255) in the given mode; 16-bit modes hold it in their high byte."""
    if mode.startswith("I;16"):  # Pillow's convert() between 16-bit modes clips: build the bytes
        byte_order = ">" if mode == "I;16B" else "<"
        return Image.frombytes(mode, (16, 16), (GRADIENT * 256).astype(f"{byte_order}u2").tobytes())
    if mode == "I":
        return Image.fromarray((GRADIENT * 256).astype(np.int32))
    if mode == "F":
        return Image.fromarray((GRADIENT / 255).astype(np.float32))
    return Image.fromarray(GRADIENT.astype(np.uint8)).convert("RGB").convert(mode)


@pytest.mark.parametrize(
    "mode", ["1", "L", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "LA", "I;16", "I;16B", "I"]
)
def test_every_image_mode_decodes_to_rgb(mode):
    rgb = np.asarray(rgb_image(_image_of_mode(mode), f"image_{mode}"))
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    if mode in ("L", "RGB", "RGBA", "RGBX", "LA", "I;16", "I;16B", "I"):  # grey stays grey; 16-bit is not clipped
        np.testing.assert_array_equal(rgb[..., 1], GRADIENT)


def test_a_16_bit_png_file_keeps_its_grey_levels(tmp_path):
    path = tmp_path / "depth.png"
    _image_of_mode("I;16").save(path)
    np.testing.assert_array_equal(np.asarray(open_rgb_image(path))[..., 0], GRADIENT)  # Pillow < 10: mode I


def test_image_modes_without_an_8_bit_meaning_are_refused_by_name(tmp_path):
    path = tmp_path / "float.tiff"
    _image_of_mode("F").save(path)
    with pytest.raises(BadImageError, match=rf"image {path} has mode F \(32-bit float pixels\).*--skip_bad_images"):
        open_rgb_image(path)
    with pytest.raises(BadImageError, match="has mode La, which cannot be converted to RGB"):
        rgb_image(Image.new("La", (4, 4)), "premultiplied")


def test_an_image_replaced_in_place_makes_the_hard_negative_file_stale(small_toy_world, tmp_path, caplog):
    datasets = copy_world(small_toy_world, tmp_path)
    index = load_split(SplitRequest(datasets, "toy_world", "train"))
    path = tmp_path / "hn.npz"
    negatives = np.tile(np.arange(10), (index.queries_num, 1))

    save_hard_negatives(
        path, negatives, {"dataset": index.name, **dataset_fingerprints(index)}, image_file_stats(index)
    )
    load_hard_negatives(path, index, 5, "hint")  # unchanged: accepted
    touched = index.absolute_path(3)
    os.utime(touched, ns=(0, 0))  # same content, another time: a warning naming it
    load_hard_negatives(path, index, 5, "hint")
    assert "1 images have another modification time" in caplog.text and index.database_paths[3] in caplog.text
    Image.new("RGB", (192, 144), (1, 2, 3)).save(touched, quality=50)  # replaced in place
    with pytest.raises(Exception, match=rf"1 images changed since .*hn.npz was mined.*{index.database_paths[3]}"):
        load_hard_negatives(path, index, 5, "hint")
