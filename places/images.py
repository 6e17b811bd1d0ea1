"""Image files: decoding to RGB (EXIF orientation applied) with errors that name the file, the preprocessing the
network expects, and the scan for unreadable images behind --skip_bad_images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.utils.data
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from tqdm import tqdm

from util import PRGSError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BadImageError(PRGSError, ValueError):
    """An image file that cannot be opened and fully decoded; the message names the file and the reason."""


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_rgb_image(path: str | Path) -> Image.Image:
    """The fully decoded RGB image at path, upright: the EXIF orientation tag is applied (cameras store a portrait
    photo as a rotated landscape one plus that tag). BadImageError naming the file on any decode error."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # convert() decodes every pixel, so truncated files fail here
        ImageOps.exif_transpose(rgb, in_place=True)  # no-op without an orientation tag (VG, MSLS, the toy world)
        return rgb
    except _DECODE_ERRORS as error:
        raise BadImageError(
            f"cannot decode image {path}: {_describe(error)}; pass --skip_bad_images to leave unreadable images out"
        ) from error


def load_image(path: str | Path, image_size: tuple[int, int] | None) -> torch.Tensor:
    """(3, H, W) float32 tensor: ``image_tensor`` of the upright RGB image at path. The same preprocessing serves
    training and evaluation."""
    return image_tensor(open_rgb_image(path), image_size)


def image_tensor(image: Image.Image, image_size: tuple[int, int] | None) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32: PIL bilinear resize to image_size=(H, W) if given and different (the
    aspect ratio is not kept: every image of a split becomes H x W), then ImageNet normalisation."""
    if image_size is not None:
        height, width = checked_image_size(image_size)
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
    tensor = TF.to_tensor(image)
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


def checked_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    """(H, W) as two positive ints, or ValueError."""
    if len(image_size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in image_size):
        raise ValueError(f"image_size must be (height, width) with two positive ints, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _DecodeCheck(torch.utils.data.Dataset):
    """Item i: (path, '') when paths[i] decodes, (path, reason) when it does not."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, str]:
        try:
            open_rgb_image(self.paths[i])
        except BadImageError as error:
            return self.paths[i], _describe(error.__cause__ or error)
        return self.paths[i], ""


def _as_list(batch: list) -> list:
    return batch


def find_unreadable_images(paths: Sequence[Path], num_workers: int = 0) -> list[tuple[str, str]]:
    """(path, reason) of every image in paths that cannot be fully decoded, in the order of paths.

    Decodes every image (DataLoader workers, tqdm progress)."""
    loader = torch.utils.data.DataLoader(
        _DecodeCheck(paths), batch_size=32, num_workers=num_workers, collate_fn=_as_list
    )
    unreadable = []
    for batch in tqdm(loader, desc="checking images", unit="batch", leave=False):
        unreadable.extend((path, reason) for path, reason in batch if reason)
    return unreadable
