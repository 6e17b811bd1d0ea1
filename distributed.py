"""Several processes launched by torchrun (one per GPU, or CPU processes): who this process is (rank, world size),
joining and leaving the process group, which part of a list of images is this rank's, gathering the parts, and
stopping every rank together when one fails. docs/distributed.md has the launch commands and what each script does.

In one process (plain ``python``, or torchrun with one process) nothing is initialised and every helper is the
identity: the one-process path runs exactly the code it ran before this module existed. The run's folder, logging
and failures on each rank are runs.py's (it asks this module who this process is).
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import util


class DistributedError(util.PRGSError, RuntimeError):
    """Another rank failed (the message names it and carries its error), or a launch this project cannot run."""


# ----------------------------------------------------------------------------------------------------------------
# Who am I


def launched_world_size() -> int:
    """The number of processes torchrun started (its WORLD_SIZE), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the only rank that writes logs, checkpoints, pictures and results."""
    return rank() == 0


# ----------------------------------------------------------------------------------------------------------------
# Start and end


def init(device_name: str, timeout_minutes: float) -> torch.device:
    """This rank's device; under torchrun with several processes, also join the process group (NCCL when the device
    is a GPU, gloo on the CPU) with ``timeout_minutes`` as the longest wait at a collective before it fails.

    'cuda' becomes cuda:LOCAL_RANK (one process per GPU); one process resolves the device as util.resolve_device."""
    device = util.resolve_device(device_name)
    if launched_world_size() == 1:
        return device
    if device.type == "cuda":
        if _local_rank() >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {_local_rank()} has no GPU: torch sees {torch.cuda.device_count()} on "
                f"{socket.gethostname()}; start at most that many processes per machine (--nproc_per_node)"
            )
        device = torch.device("cuda", _local_rank())
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend, device_id = ("nccl", device) if device.type == "cuda" else ("gloo", None)
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), device_id=device_id)
    return device


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def launch_summary() -> str:
    """How many processes there are, how many on this machine, and the backend, for the log."""
    return (
        f"{world_size()} processes ({int(os.environ.get('LOCAL_WORLD_SIZE', '1'))} on this machine, "
        f"{dist.get_backend()})"
    )


def leave() -> None:
    """Leave the process group, when this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Sharding and gathering


def shard_bounds(count: int, batch_size: int, of_rank: int | None = None, world: int | None = None) -> slice:
    """This rank's contiguous part of ``count`` items, made of whole batches of ``batch_size`` (the last one may be
    short): every item is in the same batch as in one process, so batched results equal a one-process run's.
    Ranks get the same number of batches, or one more or less; some get none when there are fewer batches."""
    of_rank = rank() if of_rank is None else of_rank
    world = world_size() if world is None else world
    batches = -(-count // batch_size)
    first, last = batches * of_rank // world, batches * (of_rank + 1) // world
    return slice(min(first * batch_size, count), min(last * batch_size, count))


def shard_sizes(count: int, batch_size: int) -> list[int]:
    """How many of ``count`` items each rank gets from shard_bounds, in rank order."""
    world = world_size()
    return [len(range(count)[shard_bounds(count, batch_size, r, world)]) for r in range(world)]


def gather_rows(local: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Every rank's rows (n_r, ...) concatenated in rank order (sum n_r, ...), on every rank, as the input's type.
    Ranks may hold different numbers of rows (none included). One process: the input itself."""
    if world_size() == 1:
        return local
    is_numpy = isinstance(local, np.ndarray)
    rows = torch.from_numpy(np.ascontiguousarray(local)) if is_numpy else local.detach()
    device = _collective_device()
    counts = torch.tensor([len(rows)], device=device)
    all_counts = [torch.zeros_like(counts) for _ in range(world_size())]
    dist.all_gather(all_counts, counts)
    counts = [int(c) for c in all_counts]
    padded = torch.zeros((max(max(counts), 1), *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: len(rows)] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    gathered = torch.cat([part[:count] for part, count in zip(parts, counts)]).to(rows.device)
    return gathered.numpy() if is_numpy else gathered


def mean_over_ranks(values: list[float]) -> list[float]:
    """The mean of each value over the ranks (float64), on every rank."""
    if world_size() == 1:
        return values
    summed = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(summed)
    return (summed / world_size()).tolist()


def broadcast_object(value: Any, source: int = 0) -> Any:
    """Rank ``source``'s picklable value, on every rank (one process: the value itself)."""
    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source, device=_collective_device())
    return holder[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    """Where tensors go for a collective: the current GPU with NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap_for_training(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel(module) when there are several ranks (gradients averaged across them in backward),
    else the module itself."""
    if world_size() == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    # conv weights with a size-1 dimension get gradients whose (irrelevant) stride there differs from the weight's
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)


# ----------------------------------------------------------------------------------------------------------------
# Failing together


@contextmanager
def stop_together(stage: str) -> Iterator[None]:
    """Around a block that every rank runs on its own part (its images, its queries). When the block raises on some
    rank, every rank raises when it leaves the block: that rank its own error, the others a DistributedError that
    names it and carries its message, so no rank waits for a part that will never come. One process: nothing."""
    if world_size() == 1:
        yield
        return
    failure = None
    try:
        yield
    except Exception as error:  # re-raised below, after the other ranks have heard of it
        failure = error
    messages: list[str | None] = [None] * world_size()
    dist.all_gather_object(messages, None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    failed = [(number, message) for number, message in enumerate(messages) if message is not None]
    if failed:
        number, message = failed[0]
        raise DistributedError(f"rank {number} failed while {stage} ({message})")
