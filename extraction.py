"""Extraction: the one loop that runs a network over the images of a split (``image_batches``), and what goes
through it: the global descriptors and the local-feature store of an evaluation (``extract_features``), global
descriptors for mining (``global_descriptors``) and the frozen-backbone cache of training (``FrozenBackboneCache``).
Under torchrun each rank takes its whole batches and every rank receives every descriptor (docs/distributed.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data
from tqdm import tqdm

import distributed
import util
from config import EvalSettings
from datasets_ws import RawImageDataset
from feature_store import (
    LocalFeatureStore,
    MemoryFeatureStore,
    ShardedStore,
    StoreLayout,
    choose_tier,
    create_store,
)
from model.backbone import patch_grid
from model.network import PRGSNetwork
from model.reranker import RerankKernel, rerank_kernel
from places.images import IMAGENET_MEAN, IMAGENET_STD, decode_images, normalize_images
from places.index import PlaceIndex
from retrievers import GlobalRetriever

logger = logging.getLogger(__name__)


@dataclass
class ExtractionSettings:
    """How the image loop reads and runs a split's images."""

    image_size: tuple[int, int]  # (H, W) the images are resized to
    device: torch.device
    batch_size: int
    num_workers: int  # DataLoader worker processes
    precision: str = "fp32"  # "bf16": the forward runs under bfloat16 autocast
    decoder: str = "pil"  # "pil" (workers decode) or "torchvision" (workers read, the device decodes)
    preprocessing: str = "pil"  # or "reference": the reference's test-time function (PIL only)

    @classmethod
    def of(cls, settings: EvalSettings) -> ExtractionSettings:
        """An evaluation's image loop: its image size, device, batch size, workers, precision and decoding."""
        return cls(
            tuple(settings.image_size),
            settings.device,
            settings.infer_batch_size,
            settings.num_workers,
            settings.precision,
            settings.image_decoder,
            settings.preprocessing,
        )


# ----------------------------------------------------------------------------------------------------------------
# The image loop


def image_batches(
    network: torch.nn.Module,
    forward: Callable[[torch.Tensor], Any],
    index: PlaceIndex,
    image_ids: Sequence[int] | np.ndarray,
    loop: ExtractionSettings,
    description: str = "extracting",
    stopwatch: util.Stopwatch | None = None,
    load_stopwatch: util.Stopwatch | None = None,
) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield (image ids (b,), forward(images (b, 3, H, W) on ``loop.device``)) over the images ``image_ids`` (global
    indices of ``index``) in order, in inference mode, under autocast when loop.precision is bf16, with ``network``
    in eval mode (its mode is restored afterwards). ``stopwatch`` times the forward passes alone, ``load_stopwatch``
    the wait for each batch of images until it is on the device, decoded and normalised. loop.decoder: "pil"
    (DataLoader workers decode) or "torchvision" (workers read the files, the device decodes; places/images.py).
    loop.preprocessing: "pil" or "reference" (the reference's test-time function, computed by the workers; PIL
    only)."""
    device = loop.device
    dataset = RawImageDataset(index, loop.image_size, loop.decoder, loop.preprocessing)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, [int(i) for i in image_ids]),
        batch_size=loop.batch_size,
        num_workers=loop.num_workers,
        pin_memory=device.type == "cuda" and loop.decoder == "pil",  # bytes of varying length are not pinned
        generator=torch.Generator(),
        collate_fn=None if loop.decoder == "pil" else _as_lists,
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
                    images, ids = _on_device(batch, dataset, device, loop.image_size)
                with stopwatch, util.autocast(device, loop.precision):
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
    model: PRGSNetwork,
    index: PlaceIndex,
    image_ids: Sequence[int] | np.ndarray,
    loop: ExtractionSettings,
    description: str = "global descriptors",
    retriever: GlobalRetriever | None = None,
) -> np.ndarray:
    """Global descriptors (n, D) float32 of the images ``image_ids`` (global indices of ``index``), in that order,
    from the network's global-only mode, or from ``retriever`` (another global model) when given. With several
    ranks each computes its whole batches of the list (distributed.shard_bounds) and every rank receives all n
    rows."""
    image_ids = np.asarray(image_ids, dtype=np.int64)
    own = image_ids[distributed.shard_bounds(len(image_ids), loop.batch_size)]
    descriptors = np.empty((len(own), descriptor_dim(model, retriever, loop)), dtype=np.float32)
    network = model if retriever is None else retriever.model
    start = 0
    with distributed.stop_together(description):
        for _, (batch, _) in image_batches(
            network, shortlist_forward(model, retriever, with_local=False), index, own, loop, description
        ):
            descriptors[start : start + len(batch)] = batch.float().cpu().numpy()
            start += len(batch)
    return distributed.gather_rows(descriptors)


def descriptor_dim(model: PRGSNetwork, retriever: GlobalRetriever | None, loop: ExtractionSettings) -> int:
    """D of the global descriptors that make the shortlist: the network's, or the retriever's (measured on one grey
    image of the loop's size, since a hub model need not say)."""
    if retriever is None:
        return model.config.fc_output_dim
    grey = torch.full((1, 3, *loop.image_size), 0.5)  # (1, 3, H, W) pixels in [0, 1]
    return int(retriever.describe(grey).shape[1])


def shortlist_forward(
    model: PRGSNetwork, retriever: GlobalRetriever | None, with_local: bool
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    """The image loop's forward: ImageNet-normalised images (b, 3, H, W) -> (global descriptors (b, D) that make
    the shortlist, local features (b, L, C) or None without ``with_local``). The global descriptors are the
    network's, or with a ``retriever`` that model's, fed the same pixels un-normalised (it applies its own size and
    normalisation); the local features are always the network's."""

    def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if retriever is None:
            output = model(images, global_only=not with_local)
            return (output, None) if not with_local else output
        local = model(images)[1] if with_local else None
        return retriever.describe(unnormalized(images)), local

    return forward


def unnormalized(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised images (b, 3, H, W) -> pixels in [0, 1] (the inverse of places.images.normalize_images,
    clamped against rounding)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------
# An evaluation's extraction: global descriptors and the local-feature store


def extract_features(
    model: PRGSNetwork,
    index: PlaceIndex,
    settings: EvalSettings,
    store_folder: Path | None,
    retriever: GlobalRetriever | None = None,
) -> tuple[np.ndarray, LocalFeatureStore | MemoryFeatureStore | ShardedStore | None, dict[str, float]]:
    """Global descriptors (N, D) in RAM and local features in a store (feature_store.py), database first, then
    queries. The global descriptors are the network's, or ``retriever``'s when another global model makes the
    shortlist (shortlist_forward); the local features are always the network's.

    Returns (descriptors, the store ready for reading, timings): per database / queries, extraction_ms_per_image
    (everything), load_ms_per_image (waiting for decoded images on the device), forward_ms_per_image (network
    only) and store_write_ms_per_image (the stage-0 self graph when the kernel precomputes it, and the write), of
    this rank's images. With store_folder None only global descriptors are computed (global-only forward) and no
    store is returned. With several ranks each extracts its whole batches (shard_layout) into its own disk store,
    store_folder/rank_<r>, every rank receives all descriptors, and the store returned reads every rank's part.
    """
    kernel, world, store = rerank_kernel(settings.rerank_kernel), distributed.world_size(), None
    holder, rows = shard_layout(index.database_num, index.queries_num, settings.infer_batch_size, world)
    mine = holder == distributed.rank()
    if store_folder is not None:
        store = _rank_store(model, int(mine.sum()), settings, kernel, store_folder)
    grid, loop = patch_grid(settings.image_size), ExtractionSettings.of(settings)
    descriptors = np.empty((len(index), descriptor_dim(model, retriever, loop)), dtype=np.float32)
    forward_pass = shortlist_forward(model, retriever, with_local=store is not None)
    timings = {}
    for part, image_ids in (
        ("database", np.arange(index.database_num)),
        ("queries", np.arange(index.database_num, len(index))),
    ):
        own = image_ids[mine[image_ids]]
        forward, load, write = (util.Stopwatch(settings.device) for _ in range(3))
        start = time.perf_counter()
        with distributed.stop_together(f"extracting {part}"):
            for ids, (global_batch, local) in image_batches(
                model, forward_pass, index, own, loop, f"extracting {part}", forward, load
            ):
                descriptors[ids] = global_batch.float().cpu().numpy()
                if store is not None:
                    with write, torch.inference_mode():
                        stage0 = model.stage0_nodes(local, grid, kernel) if kernel.precomputed_stage0 else None
                        _write_to_store(store, rows[ids], local, stage0)
        count = max(1, len(own))
        for name, seconds in (("extraction", time.perf_counter() - start), ("load", load.seconds),
                              ("forward", forward.seconds), ("store_write", write.seconds)):  # fmt: skip
            timings[f"{name}_ms_per_image_{part}"] = 1000 * seconds / count
        if world > 1:
            descriptors[image_ids] = distributed.gather_rows(descriptors[own])
    return descriptors, _finished_store(store, store_folder, holder, rows), timings


def _rank_store(
    model: PRGSNetwork, num_images: int, settings: EvalSettings, kernel: RerankKernel, store_folder: Path
) -> LocalFeatureStore | MemoryFeatureStore:
    """This process's empty store for its num_images: in store_folder, in any tier; with several ranks a disk store
    in store_folder/rank_<r>, since every rank reads every rank's rows (files on the run folder's filesystem)."""
    if distributed.world_size() == 1:
        return _new_store(model, num_images, settings, kernel, store_folder)
    folder = store_folder / f"rank_{distributed.rank()}"
    return _new_store(model, num_images, replace(settings, store_tier="disk"), kernel, folder)


def _finished_store(store, store_folder: Path | None, holder: np.ndarray, rows: np.ndarray):
    """The store ready for reading: this process's own, or, with several ranks, every rank's part read as one."""
    if store is None:
        return None
    with distributed.stop_together("writing the local-feature store"):
        store = store.finish()
    if distributed.world_size() == 1:
        return store
    store.close()
    return ShardedStore.open(store_folder, holder, rows)


def _new_store(
    model: PRGSNetwork, num_images: int, settings: EvalSettings, kernel: RerankKernel, folder: Path
) -> LocalFeatureStore | MemoryFeatureStore:
    """An empty store for ``num_images`` in the tier ``settings.store_tier`` (auto: feature_store.choose_tier)."""
    layout = StoreLayout(
        patch_grid(settings.image_size),
        settings.image_size,
        model.backbone.patch_size,
        model.config.num_kept_nodes,
        model.config.local_dim,
        content="stage0" if kernel.precomputed_stage0 else "nodes",
        feature_dtype=settings.store_dtype,
    )
    tier, why = choose_tier(settings.store_tier, num_images, layout, settings.device)
    logger.info(
        "local-feature store: %s tier (%s), %s %s rows, %d B per image",
        tier,
        why,
        layout.content,
        layout.feature_dtype,
        layout.bytes_per_image,
    )
    return create_store(folder, num_images, layout, tier, settings.device)


def _write_to_store(
    store: LocalFeatureStore | MemoryFeatureStore, ids: np.ndarray, nodes: torch.Tensor, stage0: torch.Tensor | None
) -> None:
    """store.write, with a failed write of the disk tier (a full disk) reported as an OutputWriteError naming it."""
    try:
        store.write(ids, nodes, stage0)
    except OSError as error:
        raise util.OutputWriteError(
            f"cannot write the local-feature store {store.folder}: {util.describe_write_error(error, store.folder)}"
        ) from error


def shard_layout(database_num: int, queries_num: int, batch_size: int, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Who extracts and stores each image of a split when ``world`` ranks share it: (the rank (N,), the row in that
    rank's store (N,)). Rank r takes its whole batches of the database, then of the queries
    (distributed.shard_bounds), and stores them in that order. One rank: rank 0 and row = image index."""
    holder = np.empty(database_num + queries_num, dtype=np.int64)
    rows = np.empty(database_num + queries_num, dtype=np.int64)
    for number in range(world):
        database = np.arange(database_num)[distributed.shard_bounds(database_num, batch_size, number, world)]
        queries = (
            database_num + np.arange(queries_num)[distributed.shard_bounds(queries_num, batch_size, number, world)]
        )
        holder[database], rows[database] = number, np.arange(len(database))
        holder[queries], rows[queries] = number, len(database) + np.arange(len(queries))
    return holder, rows


# ----------------------------------------------------------------------------------------------------------------
# The frozen-backbone cache of training


class FrozenBackboneCache:
    """Backbone outputs (tokens, attention) of every training image, computed once: with the backbone frozen
    (stage reranker) they never change, so each step only runs local_head and the reranker."""

    def __init__(self, model: PRGSNetwork, index: PlaceIndex, loop: ExtractionSettings):
        own = np.arange(len(index))[distributed.shard_bounds(len(index), loop.batch_size)]  # this rank's whole batches
        descriptors, tokens, attention = [], [], []
        with distributed.stop_together("caching frozen backbone outputs"):
            for _, out in image_batches(
                model,
                lambda images: model.backbone_outputs(images, with_local=True),
                index,
                own,
                loop,
                "caching frozen backbone outputs",
            ):
                descriptors.append(out.global_descriptor.float().cpu())
                tokens.append(out.tokens.float().cpu())
                attention.append(out.attention.float().cpu())
        grid = patch_grid(loop.image_size)
        num_nodes = grid[0] * grid[1]
        self.descriptors = distributed.gather_rows(_cat(descriptors, model.config.fc_output_dim)).numpy()  # (N, D)
        self.tokens = distributed.gather_rows(_cat(tokens, num_nodes, model.backbone.token_dim))  # (N, L, C)
        self.attention = distributed.gather_rows(_cat(attention, num_nodes))  # (N, L)
        self.image_size = tuple(loop.image_size)
        logger.info(
            "cached frozen backbone outputs of %d images (%.0f MB)",
            len(self.tokens),
            (self.tokens.numel() + self.attention.numel()) * 4 / 2**20,
        )

    def local(self, model: PRGSNetwork, image_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Nodes (n, L, C) of the images ``image_ids`` (global indices), through the current local_head."""
        return model.local_nodes(
            self.tokens[image_ids].to(device), self.attention[image_ids].to(device), self.image_size
        )


def _cat(parts: list[torch.Tensor], *row_shape: int) -> torch.Tensor:
    """torch.cat(parts), or an empty (0, *row_shape) tensor for a rank that had no images."""
    return torch.cat(parts) if parts else torch.empty(0, *row_shape)
