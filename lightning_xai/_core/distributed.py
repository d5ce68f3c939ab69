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
