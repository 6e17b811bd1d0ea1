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
from datasets_ws import ImageDataset
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
) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield (image ids (b,), forward(images (b, 3, H, W) on ``device``)) over the images ``image_ids`` (global
    indices of ``index``) in order, in inference mode, under autocast when precision is bf16, with ``network`` in
    eval mode (its mode is restored afterwards). ``stopwatch`` times the forward passes alone."""
    dataset = torch.utils.data.Subset(ImageDataset(index, image_size), [int(i) for i in image_ids])
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator(),
    )
    stopwatch = stopwatch or util.Stopwatch(device)
    was_training = network.training
    network.eval()
    try:
        with torch.inference_mode():
            for images, ids in tqdm(loader, desc=description, unit="batch", leave=False):
                with stopwatch, util.autocast(device, precision):
                    output = forward(images.to(device, non_blocking=True))
                yield ids.numpy(), output
    finally:
        network.train(was_training)


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
        ):
            descriptors[start : start + len(batch)] = batch.float().cpu().numpy()
            start += len(batch)
    return distributed.gather_rows(descriptors)
