"""Slot bookkeeping of the GPEX callback: which cache slot each training row goes to, and which rows go at all.

A batch's slots are its positions in the epoch's training stream modulo the cache bound (so no dataset index is
needed); the bound comes from ``max_inducing`` or from the training loader's length per process. Before a write, a
batch is reduced to finite rows with distinct slots and distinct examples (the gradient-carrying rows of a matching
step must be distinct slots, and each example is cached once). These are plain tensor functions with no model,
surrogate or trainer in them, kept apart so that the callback only sequences them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import IterableDataset

__all__ = [
    "STREAM_MAX_INDUCING",
    "bound_per_rank",
    "dataset_index",
    "distinct",
    "examples_per_rank",
    "finite_rows",
    "first_occurrences",
    "stream_slots",
]

#: default bound of the cache (rows over all processes) when the training set has no length (a stream)
STREAM_MAX_INDUCING = 65_536


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows that are finite in every tensor (all share the leading batch dimension)."""
    ok = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t.reshape(t.shape[0], -1)).all(1).to(ok.device)
    return ok


def stream_slots(start: int, size: int, bound: int | None, device: torch.device) -> torch.Tensor:
    """(size,) slots of the stream positions ``start, start + 1, ...``, modulo ``bound`` when there is one."""
    slots = torch.arange(start, start + size, device=device)
    return slots % bound if bound is not None else slots


def dataset_index(index_fn: Callable[[Any], Any], batch: Any, size: int, device: torch.device) -> torch.Tensor:
    """(size,) int64 dataset indices of a batch from ``index_fn``, checked to be one non-negative index per row."""
    index = torch.as_tensor(index_fn(batch)).reshape(-1).to(device=device, dtype=torch.long)
    if index.numel() != size or (size and int(index.min()) < 0):
        raise ValueError(f"index_fn must return {size} non-negative dataset indices, got {tuple(index.shape)}")
    return index


def bound_per_rank(max_inducing: int | None, world: int, loaders: Any = None) -> int:
    """Rows one of ``world`` processes may cache: ``max_inducing`` split over the processes, else the examples its
    training sampler deals per epoch (``loaders``: the trainer's training loaders, or None), else the stream
    default."""
    world = max(1, world)
    if max_inducing is not None:
        return -(-max_inducing // world)
    examples = None if loaders is None else examples_per_rank(loaders, world)
    return examples if examples else -(-STREAM_MAX_INDUCING // world)


def examples_per_rank(loaders: Any, world: int) -> int | None:
    """Examples one process's training loader deals per epoch, when it can tell; ``None`` for a stream."""
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, IterableDataset):
        return None
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
    for sized, share in ((sampler, 1), (dataset, world)):  # a DistributedSampler's length is already per process
        try:
            n = len(sized)
        except TypeError:
            continue
        return -(-n // share) if n > 0 else None
    return None


def distinct(slots: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """Positions of the rows to keep, in batch order, so that slots and keys are both distinct (first occurrences
    win); ``None`` when they already are."""
    first = first_occurrences(keys)
    if first is None:
        return first_occurrences(slots)
    again = first_occurrences(slots[first])
    return first if again is None else first[again]


def first_occurrences(slots: torch.Tensor) -> torch.Tensor | None:
    """Positions of the first occurrence of each distinct slot, in batch order; ``None`` when all are distinct."""
    uniq, inverse = torch.unique(slots, return_inverse=True)
    if uniq.numel() == slots.numel():
        return None
    positions = torch.arange(slots.numel(), device=slots.device)
    first = torch.full((uniq.numel(),), slots.numel(), dtype=torch.long, device=slots.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return first.sort().values
