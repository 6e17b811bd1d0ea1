"""Image files: decoding to upright RGB (EXIF orientation applied) with errors that name the file, the two
preprocessings the network may get ('pil', this project's and the reference's training one; 'reference', the
reference's test-time function), and the scan for unreadable images behind --skip_bad_images.

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
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
EXIF_ORIENTATION = 0x0112
# what ImageOps.exif_transpose does for each EXIF orientation (1: upright already)
ORIENTATION_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
PREPROCESSINGS = ("pil", "reference")


def open_rgb_image(path: str | Path, upright: bool = True) -> Image.Image:
    """The fully decoded RGB image at path; BadImageError naming the file on any decode error, or naming the mode
    of an image whose pixels have no 8-bit meaning (see rgb_image). upright: apply the EXIF orientation tag (cameras
    store a portrait photo as a rotated landscape one plus that tag); the reference did not, so its preprocessing
    passes False."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel, so truncated files fail here (and a TIFF applies its own orientation)
            # read from the file's image: the RGB one may carry no EXIF (16-bit grey is rebuilt from its pixels)
            orientation = image.getexif().get(EXIF_ORIENTATION, 1) if upright else 1
            rgb = rgb_image(image, path)
        if orientation in ORIENTATION_TRANSPOSES:  # no tag in VG, MSLS or the toy world
            rgb = rgb.transpose(ORIENTATION_TRANSPOSES[orientation])
        return rgb
    except BadImageError:
        raise
    except _DECODE_ERRORS as error:
        raise BadImageError(
            f"cannot decode image {path}: {_describe(error)}; pass --skip_bad_images to leave unreadable images out"
        ) from error


def rgb_image(image: Image.Image, path: str | Path) -> Image.Image:
    """Any PIL mode as 8-bit RGB. Alpha is dropped as PIL's convert('RGB') does (what the reference did); 16-bit
    grey (modes I;16*, and I, which older Pillows use for 16-bit PNGs) keeps its 8 high bits instead of being
    clipped to white; float pixels (mode F) and modes PIL cannot convert are refused, naming the mode."""
    if image.mode in SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image).astype(np.int64)  # (H, W)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise BadImageError(
                f"image {path} has mode {image.mode} with values in [{values.min()}, {values.max()}], outside the "
                f"16-bit range [0, 65535]; save it as 8-bit RGB, or pass --skip_bad_images to leave it out"
            )
        return Image.fromarray((values >> 8).astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        raise BadImageError(
            f"image {path} has mode F (32-bit float pixels), which has no standard 8-bit range; save it as 8-bit "
            f"RGB, or pass --skip_bad_images to leave it out"
        )
    try:
        return image.convert("RGB")
    except ValueError as error:
        if "conversion" not in str(error):
            raise
        raise BadImageError(
            f"image {path} has mode {image.mode}, which cannot be converted to RGB ({error}); save it as 8-bit "
            f"RGB, or pass --skip_bad_images to leave it out"
        ) from error


def load_image(path: str | Path, image_size: tuple[int, int] | None, preprocessing: str = "pil") -> torch.Tensor:
    """(3, H, W) float32 tensor of the image at path, at image_size=(H, W) when given.

    'pil': image_tensor of the upright image, what training uses (as the reference's training did). 'reference':
    reference_test_tensor of the image as stored, the reference's test-time function."""
    if preprocessing == "reference":
        return reference_test_tensor(open_rgb_image(path, upright=False), image_size)
    if preprocessing != "pil":
        raise ValueError(f"preprocessing must be one of {PREPROCESSINGS}, got {preprocessing!r}")
    return image_tensor(open_rgb_image(path), image_size)


def image_tensor(image: Image.Image, image_size: tuple[int, int] | None) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, the 'pil' preprocessing: PIL bilinear resize (antialiased) to
    image_size=(H, W) if given and different (the aspect ratio is not kept: every image of a split becomes H x W),
    then ImageNet normalisation."""
    tensor = TF.to_tensor(_resized(image, image_size))
    return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD)


def _resized(image: Image.Image, image_size: tuple[int, int] | None) -> Image.Image:
    """PIL bilinear (antialiased) resize to image_size=(H, W) when given and different."""
    if image_size is None:
        return image
    height, width = checked_image_size(image_size)
    return image if image.size == (width, height) else image.resize((width, height), Image.BILINEAR)


def reference_test_tensor(image: Image.Image, image_size: tuple[int, int] | None) -> torch.Tensor:
    """The reference's test-time preprocessing, bit for bit: RGB -> [0, 1] tensor -> ImageNet
    normalisation -> bilinear resize of the float tensor to image_size, not antialiased (torchvision 0.13's
    tensor resize, i.e. interpolate with align_corners=False). Returns (3, H, W) float32."""
    tensor = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)  # (3, h, w)
    if image_size is None:
        return tensor
    height, width = checked_image_size(image_size)
    if tuple(tensor.shape[1:]) == (height, width):
        return tensor  # a same-size bilinear resize is the identity
    resized = F.interpolate(tensor[None], size=(height, width), mode="bilinear", align_corners=False, antialias=False)
    return resized[0]  # (3, H, W)


def load_image_uint8(path: str | Path, image_size: tuple[int, int] | None) -> torch.Tensor:
    """(3, H, W) uint8: load_image before its float conversion (``normalize_images`` finishes it on the device, to
    the same float32 values: to_tensor and normalize are exactly rounded element-wise operations)."""
    image = _resized(open_rgb_image(path), image_size)
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
    device (nvJPEG on CUDA), turned upright by their EXIF orientation as open_rgb_image does, resized with
    antialiased bilinear interpolation when their size differs. A batch that fails is decoded image by image; an
    image torchvision cannot decode goes through PIL, whose error names it."""
    height, width = checked_image_size(image_size)
    try:
        decoded = torchvision.io.decode_jpeg(
            list(encoded), mode=torchvision.io.ImageReadMode.RGB, device=device, apply_exif_orientation=True
        )
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
        return torchvision.io.decode_jpeg(
            data, mode=torchvision.io.ImageReadMode.RGB, device=device, apply_exif_orientation=True
        )
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
