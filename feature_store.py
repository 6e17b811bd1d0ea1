"""The local-feature store (docs/feature_store.md): per image, only the rows the reranker needs, compact, with their
grid positions, held in one of three tiers:

- "device": tensors on the reranker's device (GPU memory on CUDA), when the store fits in DEVICE_MEMORY_SHARE of the
  free device memory: rows are written and read without leaving the GPU;
- "host": tensors in host RAM (pinned when CUDA is there, so reads cross the bus asynchronously), when the store
  fits in HOST_MEMORY_SHARE of the available RAM;
- "disk": two files read with plain positioned reads (no memory map), so the process holds only the rows it asked
  for and its RAM does not grow with the dataset.

Every tier stores the same values (``StoreLayout.compact``) and rebuilds the same reranker input (``expand``), so
the tiers give identical predictions. A row holds either the nodes' ``[attention, f]`` (content "nodes"; the
coordinates are recomputed from the grid positions, the zeroed rows restored) or the reranker's stage-0 self-graph
output (content "stage0": the kept rows, then one row that stands for every zeroed node), in float16 or float32.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from model.local_features import NODE_PREFIX_DIM, node_coordinates
from schema import Field, FileFormatError, check_fields

logger = logging.getLogger(__name__)

STORE_FORMAT = "prgs-local-feature-store"
STORE_VERSION = 2
REFERENCE_BYTES_PER_IMAGE = 1200 * 131 * 4  # the reference's fp32 rows at 480x640
CONTENTS = ("nodes", "stage0")
FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
TIERS = ("device", "host", "disk")
DEVICE_MEMORY_SHARE = 0.5  # "auto" holds the store on the GPU when it takes at most this share of its free memory
HOST_MEMORY_SHARE = 0.25  # ... else in host RAM when it takes at most this share of the available RAM, else on disk
# store.json (docs/feature_store.md), besides its format and version
STORE_HEADER_FIELDS = {
    "num_images": Field("iu", minimum=0),
    "grid": Field("iu", (2,), minimum=1),
    "image_size": Field("iu", (2,), minimum=1),
    "patch_size": Field("iu", minimum=1),
    "num_kept": Field("iu", minimum=1),
    "local_dim": Field("iu", minimum=1),
    "content": Field("U", choices=CONTENTS),
    "feature_dtype": Field("U", choices=tuple(FEATURE_DTYPES)),
}


@dataclass(frozen=True)
class StoreLayout:
    """What one image's stored row holds (the same in every tier)."""

    grid: tuple[int, int]
    image_size: tuple[int, int]
    patch_size: int
    num_kept: int
    local_dim: int
    content: str = "nodes"  # "nodes" ([attention, f] of the kept nodes) or "stage0" (the stage-0 self graph's output)
    feature_dtype: str = "float16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(self.grid))
        object.__setattr__(self, "image_size", tuple(self.image_size))
        if self.content not in CONTENTS:
            raise ValueError(f"store content must be one of {CONTENTS}, got {self.content!r}")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"store dtype must be one of {tuple(FEATURE_DTYPES)}, got {self.feature_dtype!r}")
        if not 0 < self.num_kept <= self.num_nodes:
            raise ValueError(f"num_kept must be in [1, {self.num_nodes}], got {self.num_kept}")

    @property
    def num_nodes(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def node_dim(self) -> int:
        return NODE_PREFIX_DIM + self.local_dim

    @property
    def channels(self) -> int:
        """Stored channels per row: [attention, f] for "nodes", all node channels for "stage0"."""
        return 1 + self.local_dim if self.content == "nodes" else self.node_dim

    @property
    def rows(self) -> int:
        """Stored rows per image: the kept nodes, plus the zeroed nodes' shared row for "stage0"."""
        return self.num_kept + (self.content == "stage0")

    @property
    def dtype(self) -> torch.dtype:
        return FEATURE_DTYPES[self.feature_dtype]

    @property
    def index_dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.num_nodes <= np.iinfo(np.uint16).max else np.uint32)

    @property
    def feature_row_bytes(self) -> int:
        return self.rows * self.channels * self.dtype.itemsize

    @property
    def index_row_bytes(self) -> int:
        return self.num_kept * self.index_dtype.itemsize

    @property
    def bytes_per_image(self) -> int:
        return self.feature_row_bytes + self.index_row_bytes

    def compact(self, nodes: torch.Tensor, stage0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """nodes (B, L, 3 + local_dim) as the network returns them (kept rows have x > 0, the others are all zero)
        and, for content "stage0", their stage-0 output (B, L, 3 + local_dim) -> (values (B, rows, channels) in the
        nodes' dtype (the store casts them to its own), grid positions (B, num_kept) int64 ascending), on the
        nodes' device."""
        batch, num_nodes, channels = nodes.shape
        if num_nodes != self.num_nodes or channels != self.node_dim:
            raise ValueError(
                f"nodes {tuple(nodes.shape)} do not fit the store (grid {self.grid}, {self.node_dim} channels)"
            )
        kept = nodes[..., 0] > 0  # (B, L): x > 0 for every kept node
        counts = kept.sum(1)
        if (counts != self.num_kept).any():
            raise ValueError(f"expected {self.num_kept} kept nodes per image, found {counts.tolist()}")
        positions = kept.nonzero()[:, 1].reshape(batch, self.num_kept)  # (B, num_kept) ascending grid order
        images = torch.arange(batch, device=nodes.device)
        if self.content == "nodes":
            values = nodes[images[:, None], positions, NODE_PREFIX_DIM - 1 :]  # (B, num_kept, 1 + local_dim)
            return values, positions
        if stage0 is None or stage0.shape != nodes.shape:
            raise ValueError(f"a 'stage0' store needs the stage-0 output of shape {tuple(nodes.shape)} with the nodes")
        first_zeroed = (~kept).to(torch.uint8).argmax(1)  # (B,): any zeroed node stands for all of them
        shared = stage0[images, first_zeroed] * (self.num_kept < self.num_nodes)  # (B, C); zero when none is zeroed
        values = torch.cat([stage0[images[:, None], positions], shared[:, None]], dim=1)  # (B, num_kept + 1, C)
        return values, positions

    def expand(
        self,
        values: torch.Tensor,
        positions: torch.Tensor,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Compact rows -> reranker input (n, L, 3 + local_dim) in ``dtype`` on ``device``: for "nodes" the
        coordinates from the grid positions and the other rows zero; for "stage0" the shared row everywhere but at
        the kept positions. On a GPU only the compact rows cross the bus."""
        values = values.to(device, non_blocking=True)
        positions = positions.to(device, non_blocking=True).long()
        count = values.shape[0]
        rows = torch.arange(count, device=device)[:, None].expand_as(positions)  # (n, num_kept)
        if self.content == "stage0":
            nodes = values[:, -1:].to(dtype).expand(count, self.num_nodes, self.node_dim).clone()  # (n, L, C)
            nodes[rows, positions] = values[:, :-1].to(dtype)
            return nodes
        nodes = torch.zeros(count, self.num_nodes, self.node_dim, device=device, dtype=dtype)
        coordinates = node_coordinates(self.grid, self.patch_size, self.image_size, device).to(dtype)  # (L, 2)
        nodes[rows, positions, : NODE_PREFIX_DIM - 1] = coordinates[positions]
        nodes[rows, positions, NODE_PREFIX_DIM - 1 :] = values.to(dtype)
        return nodes

    def header(self, num_images: int) -> dict:
        layout = asdict(self)
        layout.update(grid=list(self.grid), image_size=list(self.image_size))
        return dict(
            format=STORE_FORMAT,
            version=STORE_VERSION,
            num_images=num_images,
            **layout,
            index_dtype=self.index_dtype.name,
            bytes_per_image=self.bytes_per_image,
        )


# ----------------------------------------------------------------------------------------------------------------
# Tiers


def choose_tier(requested: str, num_images: int, layout: StoreLayout, device: torch.device) -> tuple[str, str]:
    """(tier, why) for a store of ``num_images``: ``requested`` unless "auto"; "auto" takes the first tier of
    device / host / disk whose memory share holds the store (the device tier only on CUDA)."""
    if requested not in ("auto", *TIERS):
        raise ValueError(f"store tier must be auto or one of {TIERS}, got {requested!r}")
    size = num_images * layout.bytes_per_image
    if requested != "auto":
        return requested, f"--store_tier {requested}"
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if size <= DEVICE_MEMORY_SHARE * free:
            return "device", f"{size / 1e9:.2f} GB <= {DEVICE_MEMORY_SHARE:.0%} of {free / 1e9:.1f} GB free on {device}"
    available = available_host_memory()
    if size <= HOST_MEMORY_SHARE * available:
        return "host", f"{size / 1e9:.2f} GB <= {HOST_MEMORY_SHARE:.0%} of {available / 1e9:.1f} GB available RAM"
    return "disk", f"{size / 1e9:.2f} GB > {HOST_MEMORY_SHARE:.0%} of {available / 1e9:.1f} GB available RAM"


def available_host_memory() -> int:
    """Bytes of RAM available to new allocations (MemAvailable on Linux, else the free physical pages)."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def create_store(
    folder: str | Path, num_images: int, layout: StoreLayout, tier: str, device: torch.device
) -> LocalFeatureStore | MemoryFeatureStore:
    """A new, empty store of the given tier (``choose_tier``); write every image, then ``finish()`` for reading."""
    if tier == "disk":
        return LocalFeatureStore.create(folder, num_images, layout=layout)
    if tier == "device":
        return MemoryFeatureStore(num_images, layout, device, pinned=False, tier="device")
    if tier == "host":
        return MemoryFeatureStore(num_images, layout, torch.device("cpu"), pinned=device.type == "cuda", tier="host")
    raise ValueError(f"store tier must be one of {TIERS}, got {tier!r}")


class StoreReader:
    """What every tier reads the same way, from its ``layout`` (StoreLayout) and its own ``read_compact``."""

    layout: StoreLayout

    @property
    def content(self) -> str:
        return self.layout.content

    @property
    def bytes_per_image(self) -> int:
        return self.layout.bytes_per_image

    def read_compact(self, image_indices) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def expand(self, values: torch.Tensor, positions: torch.Tensor, device: torch.device | str = "cpu"):
        """Compact rows -> reranker input (n, L, 3 + local_dim) float32 on ``device`` (StoreLayout.expand)."""
        return self.layout.expand(values, positions, device)

    def read(self, image_indices, device: torch.device | str = "cpu") -> torch.Tensor:
        """Reranker input rows of ``image_indices``: (n, L, 3 + local_dim) float32 on ``device``."""
        return self.expand(*self.read_compact(image_indices), device=device)


class MemoryFeatureStore(StoreReader):
    """The device and host tiers: values (num_images, rows, channels) and positions (num_images, num_kept) held in
    tensors on ``device`` (pinned host memory when ``pinned``)."""

    def __init__(
        self, num_images: int, layout: StoreLayout, device: torch.device, pinned: bool = False, tier: str = "device"
    ):
        self.num_images, self.layout, self.device, self.pinned = num_images, layout, torch.device(device), pinned
        self.tier = tier
        index_dtype = torch.int16 if layout.num_nodes <= torch.iinfo(torch.int16).max else torch.int32
        options = dict(device=self.device, pin_memory=pinned)
        self.values = torch.empty(num_images, layout.rows, layout.channels, dtype=layout.dtype, **options)
        self.positions = torch.empty(num_images, layout.num_kept, dtype=index_dtype, **options)
        self._written = np.zeros(num_images, dtype=bool)

    def write(self, image_indices, nodes: torch.Tensor, stage0: torch.Tensor | None = None) -> None:
        """Rows of images ``image_indices`` from their nodes (B, L, 3 + local_dim) (and stage-0 output)."""
        indices = _checked_indices(image_indices, self.num_images)
        values, positions = self.layout.compact(nodes.detach(), None if stage0 is None else stage0.detach())
        target = torch.from_numpy(indices).to(self.device)
        self.values[target] = values.to(self.device, self.values.dtype)
        self.positions[target] = positions.to(self.device, self.positions.dtype)
        self._written[indices] = True

    def finish(self) -> MemoryFeatureStore:
        """Check that every image was written; the store is then read as it is."""
        _check_complete(self._written)
        return self

    def read_compact(self, image_indices) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored rows of ``image_indices`` (values (n, rows, channels), positions (n, num_kept)), gathered
        where they are held (into pinned memory for the host tier on a CUDA machine)."""
        indices = torch.from_numpy(_checked_indices(image_indices, self.num_images)).to(self.device)
        if not self.pinned:
            return self.values[indices], self.positions[indices]
        values = torch.empty(len(indices), *self.values.shape[1:], dtype=self.values.dtype, pin_memory=True)
        positions = torch.empty(len(indices), self.positions.shape[1], dtype=self.positions.dtype, pin_memory=True)
        torch.index_select(self.values, 0, indices, out=values)
        torch.index_select(self.positions, 0, indices, out=positions)
        return values, positions

    def close(self) -> None:
        self.values = self.positions = None


class LocalFeatureStore(StoreReader):
    """The disk tier: write once (``create``, ``write`` rows in any order, ``close``), then ``open`` and ``read``
    many times. Files: store.json (written last), local_features.f16 (or .f32), local_index.u16."""

    tier = "disk"

    def __init__(self, folder: str | Path, num_images: int, layout: StoreLayout):
        self.folder = Path(folder)
        self.num_images, self.layout = num_images, layout
        self._files: dict[str, object] = {}

    @property
    def feature_file(self) -> str:
        return "local_features." + {"float16": "f16", "float32": "f32"}[self.layout.feature_dtype]

    # -- creation -------------------------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        folder: str | Path,
        num_images: int,
        grid: tuple[int, int] | None = None,
        image_size: tuple[int, int] | None = None,
        patch_size: int | None = None,
        num_kept: int | None = None,
        local_dim: int | None = None,
        layout: StoreLayout | None = None,
    ) -> LocalFeatureStore:
        """A new, empty store (files pre-sized; an existing store in ``folder`` is replaced). Give a ``layout``, or
        the fields of a "nodes", float16 one."""
        layout = layout or StoreLayout(grid, image_size, patch_size, num_kept, local_dim)
        store = cls(folder, num_images, layout)
        store.folder.mkdir(parents=True, exist_ok=True)
        (store.folder / "store.json").unlink(missing_ok=True)  # the header is written last, by close()
        files = ((store.feature_file, layout.feature_row_bytes), ("local_index.u16", layout.index_row_bytes))
        for name, row_bytes in files:
            with open(store.folder / name, "wb") as file:
                file.truncate(num_images * row_bytes)
        store._written = np.zeros(num_images, dtype=bool)
        return store

    def write(self, image_indices, nodes: torch.Tensor, stage0: torch.Tensor | None = None) -> None:
        """nodes (B, L, 3 + local_dim) of images ``image_indices``, as the network returns them (kept rows have
        x > 0, the others are all zero), and their stage-0 output for a "stage0" store."""
        indices = _checked_indices(image_indices, self.num_images)
        values, positions = self.layout.compact(nodes.detach(), None if stage0 is None else stage0.detach())
        features = values.to(self.layout.dtype).cpu().numpy()
        index = positions.cpu().numpy().astype(self.layout.index_dtype)
        features_file, index_file = self._open("r+b")
        for row, image in enumerate(indices):
            os.pwrite(features_file.fileno(), features[row].tobytes(), int(image) * self.layout.feature_row_bytes)
            os.pwrite(index_file.fileno(), index[row].tobytes(), int(image) * self.layout.index_row_bytes)
            self._written[image] = True

    def close(self) -> None:
        """Close the files; after writing, first check every image was written and write the header last (a store
        without store.json is incomplete)."""
        if hasattr(self, "_written"):
            _check_complete(self._written)
        for file in self._files.values():
            file.flush()
            os.fsync(file.fileno())
            file.close()
        self._files = {}
        if hasattr(self, "_written"):
            (self.folder / "store.json").write_text(json.dumps(self.layout.header(self.num_images), indent=2))
            del self._written

    def finish(self) -> LocalFeatureStore:
        """close() after writing, and the store opened for reading."""
        self.close()
        return LocalFeatureStore.open(self.folder)

    # -- reading --------------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: str | Path) -> LocalFeatureStore:
        folder = Path(folder)
        header_path = folder / "store.json"
        if not header_path.is_file():
            raise FileNotFoundError(f"{folder} is not a complete local-feature store (no store.json)")
        header = read_store_header(header_path)
        fields = ("grid", "image_size", "patch_size", "num_kept", "local_dim", "content", "feature_dtype")
        try:
            layout = StoreLayout(**{name: header[name] for name in fields})
        except ValueError as error:
            raise FileFormatError(f"{header_path}: {error}") from error
        return cls(folder, header["num_images"], layout)

    def read_compact(self, image_indices) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored rows of ``image_indices``, as on disk: (values (n, rows, channels), grid positions
        (n, num_kept) int64). File reads only: cheap to run in a background thread."""
        indices = _checked_indices(image_indices, self.num_images)
        layout = self.layout
        features = torch.empty(len(indices), layout.rows, layout.channels, dtype=layout.dtype).numpy()
        positions = np.empty((len(indices), layout.num_kept), dtype=layout.index_dtype)
        features_file, index_file = self._open("rb")
        for row, image in enumerate(indices):
            _read_exactly(features_file, features[row], int(image) * layout.feature_row_bytes)
            _read_exactly(index_file, positions[row], int(image) * layout.index_row_bytes)
        return torch.from_numpy(features), torch.from_numpy(positions.astype(np.int64))

    def _open(self, mode: str):
        if not self._files:
            self._files = {
                name: open(self.folder / name, mode, buffering=0)  # noqa: SIM115 (closed by close())
                for name in (self.feature_file, "local_index.u16")
            }
        return self._files[self.feature_file], self._files["local_index.u16"]


class ShardedStore(StoreReader):
    """The disk stores of several ranks (one LocalFeatureStore each, in <folder>/rank_<r>) read as one: the rows of
    an image come from the store of the rank that extracted it. ``holder`` (N,) is that rank and ``rows`` (N,) the
    row in its store, for every image of the split (extraction.shard_layout). Reads like a LocalFeatureStore."""

    tier = "disk"

    def __init__(self, stores: list[LocalFeatureStore], holder: np.ndarray, rows: np.ndarray):
        self.stores, self.holder, self.rows = stores, holder, rows
        self.layout = stores[0].layout

    @classmethod
    def open(cls, folder: str | Path, holder: np.ndarray, rows: np.ndarray) -> ShardedStore:
        folder = Path(folder)
        return cls([LocalFeatureStore.open(folder / f"rank_{r}") for r in range(int(holder.max()) + 1)], holder, rows)

    def read_compact(self, image_indices) -> tuple[torch.Tensor, torch.Tensor]:
        """As LocalFeatureStore.read_compact, for indices of the split, in that order."""
        image_indices = np.asarray(image_indices, dtype=np.int64).reshape(-1)
        values = positions = None
        for number, store in enumerate(self.stores):
            wanted = np.flatnonzero(self.holder[image_indices] == number)
            if len(wanted) == 0:
                continue
            part_values, part_positions = store.read_compact(self.rows[image_indices[wanted]])
            if values is None:  # (n, rows, channels) and (n, num_kept), as the parts
                values = part_values.new_empty((len(image_indices), *part_values.shape[1:]))
                positions = part_positions.new_empty((len(image_indices), *part_positions.shape[1:]))
            values[torch.from_numpy(wanted)] = part_values
            positions[torch.from_numpy(wanted)] = part_positions
        return values, positions

    def close(self) -> None:
        for store in self.stores:
            store.close()


def read_store_header(path: Path) -> dict:
    """The store.json of a disk store, checked against STORE_HEADER_FIELDS; FileFormatError naming the field."""
    try:
        header = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise FileFormatError(f"{path}: not a JSON file ({error}); extract the features again") from error
    if not isinstance(header, dict) or header.get("format") != STORE_FORMAT or header.get("version") != STORE_VERSION:
        found = (header.get("format"), header.get("version")) if isinstance(header, dict) else type(header).__name__
        raise FileFormatError(f"{path}: expected {STORE_FORMAT} version {STORE_VERSION}, found {found}")
    check_fields(path, header, STORE_HEADER_FIELDS, hint="extract the features again")
    return header


def _checked_indices(image_indices, num_images: int) -> np.ndarray:
    indices = np.asarray(image_indices, dtype=np.int64).reshape(-1)
    outside = indices[(indices < 0) | (indices >= num_images)]
    if len(outside):
        raise IndexError(f"image index {outside[0]} outside the store's {num_images} images")
    return indices


def _check_complete(written: np.ndarray) -> None:
    if not written.all():
        missing = np.flatnonzero(~written)
        raise RuntimeError(f"{len(missing)} images were never written to the store, e.g. {missing[:5].tolist()}")


def _read_exactly(file, array: np.ndarray, offset: int) -> None:
    view = memoryview(array).cast("B")
    if os.preadv(file.fileno(), [view], offset) != view.nbytes:
        raise OSError(f"{file.name}: short read at byte {offset} (the store is truncated)")
