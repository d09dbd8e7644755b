"""Several processes through torch.distributed: each rank scores on its share of the calibration, the sums are
all-reduced, and so k ranks reach the plan one process reaches.

fxprune never starts a process group on its own inside the library: a program launched by `torchrun` calls
`init_from_env()` (or `torch.distributed.init_process_group` itself) before scoring; the `fxprune prune` command
does it for the user. Without an initialised group every function here is the one-process identity.

What is split: the scorer's calibration batches (`local_share`: rank r takes batches r, r + k, r + 2k, ... of
the cut a single process makes), so every batch a rank runs is a batch one process runs too, and the additive
sums (`all_reduce_sums`) differ from one process's only in the order of the additions.
What is not: everything else runs whole on every rank (the plan, HyWIA's training, the refit), on the same
reduced statistics, so every rank holds the same plan; only rank 0 writes files (`on_rank_zero`).
"""
from __future__ import annotations

import os
from typing import Callable, Hashable, Iterable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


def active() -> bool:
    """True when a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of ranks): (0, 1) without an initialised group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group `torchrun` describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); True when one of more than one rank is (now) initialised. `backend`: "nccl" when CUDA is
    available, else "gloo", unless given. Does nothing when a group is already initialised or WORLD_SIZE
    is unset or 1."""
    if dist.is_available() and dist.is_initialized():
        return active()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {missing} are not set: launch with torchrun, which sets them")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def local_share(items: Iterable[T]) -> list[T]:
    """This rank's share of `items`: items[rank::world], a deterministic split of batches (or rows); all of
    them without a group. A rank may get none (fewer items than ranks): it still joins `all_reduce_sums`."""
    rank, world = rank_and_world()
    return list(items)[rank::world]


def _layout(value):
    return (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else type(value)


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo is sure to reduce CPU ones
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sums(sums: dict[K, torch.Tensor | float | int]) -> dict[K, torch.Tensor | float | int]:
    """`sums` added over the ranks, every rank getting the same values under the same (sortable) keys: the
    union of the ranks' keys, a key a rank lacks counting as zero there (a rank that had no batch), a key
    whose shape or type differs between ranks a RuntimeError naming it. Python numbers come back as numbers
    of their type, tensors in their dtype on their device (a key this rank lacked: on the reduce device).
    The identity without a group. For additive statistics only (sums, counts, Gram matrices, sample-weighted
    loss sums): normalise after reducing."""
    if not active():
        return dict(sums)
    layouts = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, {k: _layout(v) for k, v in sums.items()})
    union = {}
    for rank, layout in enumerate(layouts):
        for key, kind in layout.items():
            if union.setdefault(key, kind) != kind:
                raise RuntimeError(f"all_reduce_sums: {key!r} is {union[key]} on one rank and {kind} on rank {rank}")
    out = {}
    for key in sorted(union):
        kind, value = union[key], sums.get(key)
        if isinstance(kind, tuple):  # a tensor: (shape, dtype)
            buffer = (torch.zeros(kind[0], dtype=kind[1], device=_reduce_device()) if value is None
                      else value.detach().to(_reduce_device(), copy=True))
            dist.all_reduce(buffer)
            out[key] = buffer if value is None else buffer.to(value.device)
        else:  # a count or a loss sum: float64 holds it exactly enough
            buffer = torch.tensor(float(value or 0), dtype=torch.float64, device=_reduce_device())
            dist.all_reduce(buffer)
            out[key] = kind(buffer.item())
    return out


def on_rank_zero(write: Callable[[], T]) -> T:
    """`write()` on rank 0 only (files, directories); the other ranks wait for it and get its return value.
    An exception on rank 0 is raised on every rank. Collective: every rank calls it (a call on rank 0 alone
    waits forever). Plain `write()` without a group."""
    if not active():
        return write()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = write()
        except Exception as exc:  # handed to the other ranks below, then raised here too
            error = exc
    box = [(result, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    result, message = box[0]
    if message is not None:
        raise RuntimeError(f"rank 0 failed to write: {message}")
    return result
