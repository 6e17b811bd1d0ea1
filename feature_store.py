"""A compact on-disk store of local features: only the kept nodes, float16, with their grid positions
(docs/feature_store.md). ``read`` rebuilds the reranker input exactly up to float16 rounding of [attention, f]: the
coordinates are recomputed from the grid positions and the other rows are zero. Rows are read with plain file reads
(no memory map), so the process holds only the rows it asked for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from model.local_features import NODE_PREFIX_DIM, node_coordinates

STORE_FORMAT = "prgs-local-feature-store"
STORE_VERSION = 1
REFERENCE_BYTES_PER_IMAGE = 1200 * 131 * 4  # the reference's fp32 rows at 480x640


class LocalFeatureStore:
    """Write once (``create``, ``write`` rows in any order, ``close``), then ``open`` and ``read`` many times."""

    def __init__(
        self,
        folder: str | Path,
        num_images: int,
        grid: tuple[int, int],
        image_size: tuple[int, int],
        patch_size: int,
        num_kept: int,
        local_dim: int,
    ):
        self.folder = Path(folder)
        self.num_images, self.grid, self.image_size = num_images, tuple(grid), tuple(image_size)
        self.patch_size, self.num_kept, self.local_dim = patch_size, num_kept, local_dim
        self.channels = 1 + local_dim  # attention + f
        num_nodes = grid[0] * grid[1]
        self.index_dtype = np.dtype(np.uint16 if num_nodes <= np.iinfo(np.uint16).max else np.uint32)
        self.feature_row_bytes = num_kept * self.channels * 2
        self.index_row_bytes = num_kept * self.index_dtype.itemsize
        self._coordinates = node_coordinates(self.grid, patch_size, self.image_size)  # (L, 2)
        self._files: dict[str, object] = {}

    # -- creation -------------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        folder: str | Path,
        num_images: int,
        grid: tuple[int, int],
        image_size: tuple[int, int],
        patch_size: int,
        num_kept: int,
        local_dim: int,
    ) -> LocalFeatureStore:
        """A new, empty store (files pre-sized; an existing store in ``folder`` is replaced)."""
        store = cls(folder, num_images, grid, image_size, patch_size, num_kept, local_dim)
        store.folder.mkdir(parents=True, exist_ok=True)
        (store.folder / "store.json").unlink(missing_ok=True)  # the header is written last, by close()
        for name, row_bytes in (
            ("local_features.f16", store.feature_row_bytes),
            ("local_index.u16", store.index_row_bytes),
        ):
            with open(store.folder / name, "wb") as file:
                file.truncate(num_images * row_bytes)
        store._written = np.zeros(num_images, dtype=bool)
        return store

    def write(self, image_indices: np.ndarray | list[int], nodes: torch.Tensor) -> None:
        """nodes (B, L, 3 + local_dim) of images ``image_indices``, as the network returns them (kept rows have
        x > 0, the others are all zero)."""
        nodes = nodes.detach().float().cpu()
        batch, num_nodes, channels = nodes.shape
        if num_nodes != self.grid[0] * self.grid[1] or channels != NODE_PREFIX_DIM + self.local_dim:
            raise ValueError(
                f"nodes {tuple(nodes.shape)} do not fit the store (grid {self.grid}, "
                f"{NODE_PREFIX_DIM + self.local_dim} channels)"
            )
        kept = nodes[..., 0] > 0  # (B, L): x > 0 for every kept node
        counts = kept.sum(1)
        if (counts != self.num_kept).any():
            raise ValueError(f"expected {self.num_kept} kept nodes per image, found {counts.tolist()}")
        positions = kept.nonzero()[:, 1].reshape(batch, self.num_kept)  # (B, num_kept) ascending grid order
        values = nodes[kept].reshape(batch, self.num_kept, channels)[..., 2:]  # (B, num_kept, 1 + local_dim)
        features = values.numpy().astype(np.float16)
        index = positions.numpy().astype(self.index_dtype)
        features_file, index_file = self._open("r+b")
        for row, image in enumerate(np.asarray(image_indices, dtype=np.int64)):
            if not 0 <= image < self.num_images:
                raise IndexError(f"image index {image} outside the store's {self.num_images} images")
            os.pwrite(features_file.fileno(), features[row].tobytes(), int(image) * self.feature_row_bytes)
            os.pwrite(index_file.fileno(), index[row].tobytes(), int(image) * self.index_row_bytes)
            self._written[image] = True

    def close(self) -> None:
        """Close the files; after writing, first check every image was written and write the header last (a store
        without store.json is incomplete)."""
        if hasattr(self, "_written") and not self._written.all():
            missing = np.flatnonzero(~self._written)
            raise RuntimeError(f"{len(missing)} images were never written to the store, e.g. {missing[:5].tolist()}")
        for file in self._files.values():
            file.flush()
            os.fsync(file.fileno())
            file.close()
        self._files = {}
        if hasattr(self, "_written"):
            header = dict(
                format=STORE_FORMAT,
                version=STORE_VERSION,
                num_images=self.num_images,
                grid=list(self.grid),
                image_size=list(self.image_size),
                patch_size=self.patch_size,
                num_kept=self.num_kept,
                local_dim=self.local_dim,
                feature_dtype="float16",
                index_dtype=self.index_dtype.name,
                bytes_per_image=self.bytes_per_image,
            )
            (self.folder / "store.json").write_text(json.dumps(header, indent=2))
            del self._written

    # -- reading --------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path) -> LocalFeatureStore:
        folder = Path(folder)
        header_path = folder / "store.json"
        if not header_path.is_file():
            raise FileNotFoundError(f"{folder} is not a complete local-feature store (no store.json)")
        header = json.loads(header_path.read_text())
        if header.get("format") != STORE_FORMAT or header.get("version") != STORE_VERSION:
            raise ValueError(
                f"{header_path}: expected {STORE_FORMAT} version {STORE_VERSION}, found "
                f"{header.get('format')} version {header.get('version')}"
            )
        return cls(
            folder,
            header["num_images"],
            tuple(header["grid"]),
            tuple(header["image_size"]),
            header["patch_size"],
            header["num_kept"],
            header["local_dim"],
        )

    def read_compact(self, image_indices: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored rows of ``image_indices``, as on disk: ([attention, f] (n, num_kept, 1 + local_dim) float16,
        grid positions (n, num_kept) int64). File reads only: cheap to run in a background thread."""
        image_indices = np.asarray(image_indices, dtype=np.int64).reshape(-1)
        features = np.empty((len(image_indices), self.num_kept, self.channels), dtype=np.float16)
        positions = np.empty((len(image_indices), self.num_kept), dtype=self.index_dtype)
        features_file, index_file = self._open("rb")
        for row, image in enumerate(image_indices):
            if not 0 <= image < self.num_images:
                raise IndexError(f"image index {image} outside the store's {self.num_images} images")
            _read_exactly(features_file, features[row], int(image) * self.feature_row_bytes)
            _read_exactly(index_file, positions[row], int(image) * self.index_row_bytes)
        return torch.from_numpy(features), torch.from_numpy(positions.astype(np.int64))

    def expand(
        self, features: torch.Tensor, positions: torch.Tensor, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Compact rows -> reranker input (n, L, 3 + local_dim) float32 on ``device``: coordinates from the grid
        positions, the other rows zero. On a GPU only the compact rows cross the bus."""
        features = features.to(device, non_blocking=True)
        positions = positions.to(device, non_blocking=True)
        count = features.shape[0]
        nodes = torch.zeros(count, self.grid[0] * self.grid[1], NODE_PREFIX_DIM + self.local_dim, device=device)
        rows = torch.arange(count, device=device)[:, None].expand_as(positions)
        nodes[rows, positions, :2] = self._coordinates.to(device)[positions]
        nodes[rows, positions, 2:] = features.float()
        return nodes

    def read(self, image_indices: np.ndarray | list[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Reranker input rows of ``image_indices``: (n, L, 3 + local_dim) float32 on ``device``, zero rows restored."""
        return self.expand(*self.read_compact(image_indices), device=device)

    @property
    def bytes_per_image(self) -> int:
        return self.feature_row_bytes + self.index_row_bytes

    def _open(self, mode: str):
        if not self._files:
            self._files = {
                name: open(self.folder / name, mode, buffering=0)  # noqa: SIM115 (closed by close())
                for name in ("local_features.f16", "local_index.u16")
            }
        return self._files["local_features.f16"], self._files["local_index.u16"]


def _read_exactly(file, array: np.ndarray, offset: int) -> None:
    view = memoryview(array).cast("B")
    if os.preadv(file.fileno(), [view], offset) != view.nbytes:
        raise OSError(f"{file.name}: short read at byte {offset} (the store is truncated)")
