"""Image files: decoding to RGB with errors that name the file, the preprocessing the network expects, and the scan
for unreadable images behind --skip_bad_images.

Two decoders feed the image loop (extraction.image_batches): "pil" decodes and resizes in DataLoader workers and
ships uint8 pixels; "torchvision" ships the file bytes and decodes a whole batch on the compute device
(torchvision.io.decode_jpeg: nvJPEG on CUDA). Either way ``normalize_images`` finishes on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data
import torchvision.io
import torchvision.transforms.functional as TF
from PIL import Image
from tqdm import tqdm

from util import PRGSError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_DECODERS = ("pil", "torchvision")


class BadImageError(PRGSError, ValueError):
    """An image file that cannot be opened and fully decoded; the message names the file and the reason."""


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_rgb_image(path: str | Path) -> Image.Image:
    """The fully decoded RGB image at path; BadImageError naming the file on any decode error."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() decodes every pixel, so truncated files fail here
    except _DECODE_ERRORS as error:
        raise BadImageError(
            f"cannot decode image {path}: {_describe(error)}; pass --skip_bad_images to leave unreadable images out"
        ) from error


def load_image(path: str | Path, image_size: tuple[int, int] | None) -> torch.Tensor:
    """(3, H, W) float32 tensor: RGB, PIL bilinear resize to image_size=(H, W) if given and different,
    then ImageNet normalisation. The same preprocessing serves training and evaluation."""
    image = open_rgb_image(path)
    if image_size is not None:
        height, width = checked_image_size(image_size)
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
    tensor = TF.to_tensor(image)
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


def load_image_uint8(path: str | Path, image_size: tuple[int, int] | None) -> torch.Tensor:
    """(3, H, W) uint8: load_image before its float conversion (``normalize_images`` finishes it on the device, to
    the same float32 values: to_tensor and normalize are exactly rounded element-wise operations)."""
    image = open_rgb_image(path)
    if image_size is not None:
        height, width = checked_image_size(image_size)
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 ImageNet-normalised, as TF.to_tensor + TF.normalize compute it."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return images.float().div(255).sub_(mean).div_(std)


def read_image_bytes(path: str | Path) -> torch.Tensor:
    """The file's bytes as a uint8 tensor (for ``decode_images``); BadImageError naming the file if unreadable."""
    try:
        return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
    except OSError as error:
        raise BadImageError(f"cannot read image {path}: {_describe(error)}") from error


def decode_images(
    encoded: Sequence[torch.Tensor], paths: Sequence[str | Path], image_size: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """File bytes of a batch -> uint8 (B, 3, H, W) on ``device``: JPEGs decoded together by torchvision on the
    device (nvJPEG on CUDA), resized with antialiased bilinear interpolation when their size differs. A batch that
    fails is decoded image by image; an image torchvision cannot decode goes through PIL, whose error names it."""
    height, width = checked_image_size(image_size)
    try:
        decoded = torchvision.io.decode_jpeg(list(encoded), mode=torchvision.io.ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = [_decode_one(data, path, device) for data, path in zip(encoded, paths)]
    resized = []
    for image in decoded:  # (3, h, w) uint8
        if tuple(image.shape[-2:]) != (height, width):
            image = F.interpolate(image[None].float(), (height, width), mode="bilinear", antialias=True)[0]
            image = image.round_().clamp_(0, 255).to(torch.uint8)
        resized.append(image)
    return torch.stack(resized)


def _decode_one(data: torch.Tensor, path: str | Path, device: torch.device) -> torch.Tensor:
    try:
        return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device=device)
    except RuntimeError:  # not a JPEG torchvision can read (PNG, CMYK, truncated): PIL decodes it or names it
        return load_image_uint8(path, None).to(device)


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
