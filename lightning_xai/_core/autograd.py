"""Autograd helpers shared by the attribution methods."""

from __future__ import annotations

import torch


def batched_vjp(output: torch.Tensor, x: torch.Tensor, cotangents: torch.Tensor, retain: bool = False) -> torch.Tensor:
    """Rows ``cotangents[k] @ ∂output/∂x`` for all ``k`` in one batched backward; shape ``(K, *x.shape)``.

    Falls back to one backward per row where an operation has no batched backward rule.
    """
    try:
        (grads,) = torch.autograd.grad(output, x, cotangents, retain_graph=retain, is_grads_batched=True)
        return grads
    except RuntimeError:
        rows = [torch.autograd.grad(output, x, c, retain_graph=True)[0] for c in cotangents]
        return torch.stack(rows)
