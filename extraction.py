"""The one loop that runs a network over the images of a split: evaluation, mining and the frozen-backbone cache
all go through ``image_batches``."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils.data
from tqdm import tqdm

import distributed
import util
from datasets_ws import RawImageDataset
from places.images import decode_images, normalize_images
from places.index import PlaceIndex


def image_batches(
    network: torch.nn.Module,
    forward: Callable[[torch.Tensor], Any],
    index: PlaceIndex,
    image_ids: Sequence[int] | np.ndarray,
    image_size: tuple[int, int],
    device: torch.device,
    batch_size: int,
    num_workers: int,
    precision: str = "fp32",
    description: str = "extracting",
    stopwatch: util.Stopwatch | None = None,
    load_stopwatch: util.Stopwatch | None = None,
    decoder: str = "pil",
    preprocessing: str = "pil",
) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield (image ids (b,), forward(images (b, 3, H, W) on ``device``)) over the images ``image_ids`` (global
    indices of ``index``) in order, in inference mode, under autocast when precision is bf16, with ``network`` in
    eval mode (its mode is restored afterwards). ``stopwatch`` times the forward passes alone, ``load_stopwatch``
    the wait for each batch of images until it is on the device, decoded and normalised. ``decoder``: "pil"
    (DataLoader workers decode) or "torchvision" (workers read the files, the device decodes; places/images.py).
    ``preprocessing``: "pil" or "reference" (the reference's test-time function, computed by the workers; PIL only)."""
    dataset = RawImageDataset(index, image_size, decoder, preprocessing)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, [int(i) for i in image_ids]),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda" and decoder == "pil",  # bytes of varying length are not pinned
        generator=torch.Generator(),
        collate_fn=None if decoder == "pil" else _as_lists,
    )
    stopwatch = stopwatch or util.Stopwatch(device)
    load_stopwatch = load_stopwatch or util.Stopwatch(device)
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode():
            batches = iter(tqdm(loader, desc=description, unit="batch", leave=False))
            while True:
                with load_stopwatch:
                    batch = next(batches, None)
                    if batch is None:
                        break
                    images, ids = _on_device(batch, dataset, device, image_size)
                with stopwatch, util.autocast(device, precision):
                    output = forward(images)
                yield ids, output
    finally:
        network.train(was_training)


def _as_lists(batch: list) -> tuple[list, list]:
    """Collate (bytes, id) items into ([bytes, ...], [id, ...]): encoded images differ in length."""
    return [item[0] for item in batch], [item[1] for item in batch]


def _on_device(batch, dataset: RawImageDataset, device: torch.device, image_size) -> tuple[torch.Tensor, np.ndarray]:
    """A loader batch -> (normalised images (b, 3, H, W) float32 on ``device``, ids (b,))."""
    pixels, ids = batch
    ids = np.asarray(ids, dtype=np.int64)
    if dataset.decoder == "torchvision":
        paths = [dataset.index.absolute_path(int(i)) for i in ids]
        pixels = decode_images(pixels, paths, image_size, device)
    pixels = pixels.to(device, non_blocking=True)
    if pixels.is_floating_point():  # the reference's preprocessing: normalised by the workers
        return pixels, ids
    return normalize_images(pixels), ids


def global_descriptors(
    model,
    index: PlaceIndex,
    image_ids: Sequence[int] | np.ndarray,
    image_size: tuple[int, int],
    device: torch.device,
    batch_size: int,
    num_workers: int,
    precision: str = "fp32",
    description: str = "global descriptors",
    preprocessing: str = "pil",
) -> np.ndarray:
    """Global descriptors (n, D) float32 of the images ``image_ids`` (global indices of ``index``), in that order,
    from the network's global-only mode. With several ranks each computes its whole batches of the list
    (distributed.shard_bounds) and every rank receives all n rows."""
    image_ids = np.asarray(image_ids, dtype=np.int64)
    own = image_ids[distributed.shard_bounds(len(image_ids), batch_size)]
    descriptors = np.empty((len(own), model.config.fc_output_dim), dtype=np.float32)
    start = 0
    with distributed.stop_together(description):
        for _, batch in image_batches(
            model,
            lambda images: model(images, global_only=True),
            index,
            own,
            image_size,
            device,
            batch_size,
            num_workers,
            precision,
            description,
            preprocessing=preprocessing,
        ):
            descriptors[start : start + len(batch)] = batch.float().cpu().numpy()
            start += len(batch)
    return distributed.gather_rows(descriptors)
