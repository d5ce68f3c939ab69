"""Keeping callback-owned modules identical across DDP ranks.

Lightning's DDP wrapper covers only the LightningModule; a decoder or surrogate owned by a callback is invisible to
it. Each rank therefore trains its own copy, and these helpers keep the copies equal: identical initial weights
(:func:`broadcast_module`) and gradients averaged over ranks before every optimizer step
(:func:`all_reduce_gradients`), in one flat bucket so a step costs one collective. All functions are no-ops in a
single process, and every rank must call them at the same points (the schedule may depend on the step count, never
on the data).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average the gradients of ``parameters`` over all ranks.

    Parameters without a gradient are left alone; every rank runs the same computation, so the set of parameters
    with gradients is the same on all of them (a mismatch makes the collective fail loudly rather than mix tensors).
    """
    if not is_distributed():
        return
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy parameters and buffers of ``module`` from rank ``src`` to every other rank."""
    if not is_distributed():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of a tensor with ``op`` in {"sum", "min", "max"}; returns the tensor."""
    if is_distributed():
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        if op not in ops:
            raise ValueError(f"op={op!r} is not one of {sorted(ops)}")
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the running process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor``, in rank order; the leading dimension may differ between ranks (the rest may not).

    Tensors are padded to the longest one for the collective and trimmed afterwards (two collectives: the lengths,
    then the rows). One process returns ``[tensor]``.
    """
    if not is_distributed():
        return [tensor]
    world = dist.get_world_size()
    length = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = [int(n) for n in lengths]
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded.contiguous())
    return [g[:n] for g, n in zip(gathered, sizes)]
