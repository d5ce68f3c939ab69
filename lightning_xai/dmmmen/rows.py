"""Which rows a DMM-MEN fit or score uses: every process's rows in one canonical order, split by class, bad rows out.

Under DDP each process holds its own reservoir and metric set; a sampler deals the examples out in some order, with
duplicates where the dataset does not divide evenly. The DMMMEN callback gathers those rows here and keeps the
distinct ones, sorted, so that a fit or a score on the same examples is the same on one process or many. It then
splits them into the explained class's rows (with the regression target) and the others, leaving out any row whose
input or network output is NaN/Inf (the bad-row policy: such rows are counted, never fitted or scored).
"""
from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from lightning_xai.dmmmen.features import class_logit


def gathered_rows(
    trainer: pl.Trainer | None, x: torch.Tensor | None, y: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Every process's rows ``x`` (with labels ``y`` when every process has them) in canonical order (a collective
    under DDP: every rank calls it); ``(None, None)`` when no process has rows."""
    parts: list[Any] = [(x, y)]
    if trainer is not None and trainer.world_size > 1:
        parts = [None] * trainer.world_size
        dist.all_gather_object(parts, (x, y))
    xs = [p for p, _ in parts if p is not None]
    ys = [q for _, q in parts if q is not None]
    if not xs:
        return None, None
    return canonical_rows(torch.cat(xs), torch.cat(ys) if len(ys) == len(xs) else None)


def canonical_rows(x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The distinct rows of ``x`` in lexicographic order (with the label of each one's first occurrence)."""
    if x.shape[0] == 0:
        return x, y
    _, inverse = torch.unique(x.reshape(x.shape[0], -1), dim=0, return_inverse=True)
    positions = torch.arange(x.shape[0])
    first = torch.full((int(inverse.max()) + 1,), x.shape[0]).scatter_reduce(0, inverse, positions, reduce="amin")
    return x[first], None if y is None else y[first]


def split_by_class(
    x: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None, target_class: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Split ``x`` into the inputs of ``target_class`` (by label, else by the network's prediction from ``logits``
    (n, K)) with their target (the class logit, float64 CPU), and the others; rows whose input or network output is
    NaN/Inf are left out of both and counted (the last value returned)."""
    keep = torch.isfinite(logits).all(1)
    if x.is_floating_point():
        keep &= torch.isfinite(x.reshape(x.shape[0], -1)).all(1)
    left_out = int((~keep).sum())
    chosen = (labels.to(x.device) if labels is not None else logits.argmax(-1)) == target_class
    target = class_logit(logits[keep & chosen], target_class).cpu()
    return x[keep & chosen], target, x[keep & ~chosen], left_out
